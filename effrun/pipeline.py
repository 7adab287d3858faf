"""The runner, top to bottom: validate → data → train → prune → distill → quantize → benchmark.

Each model-producing stage is `result = method(model, inputs)` (the contract: effrun/stage.py);
the pipeline writes <run_dir>/<NN>_<stage>/ from the result: the model artifact, metrics.json
and stage.json. A stage whose stage.json says it finished with the same config, with its
outputs there unchanged (effrun/records.py), is not run again, so rerunning a run dir resumes
it; training itself resumes from its last checkpoint, written after each epoch and, with
train.checkpoint_every, inside one (effrun/checkpoint.py). The run
dir is locked and its records written only once the run is accepted (effrun/run_dir.py).
A model stage computed by an earlier run with the same fingerprint is reused from the stage
cache (effrun/cache.py); resume_from starts after a finished stage of another run.
Under torchrun every rank runs this file (effrun/distributed.py): they train together, rank 0
alone guards and writes the run dir, and quantize and benchmark run on rank 0 while the others
wait for its records (`distributed.on_main`); int8_qat's ranks fine-tune together first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from effrun import artifacts, distributed, export, records, select
from effrun import cache as stage_cache
from effrun import run_dir as run_dir_guard
from effrun.benchmark import benchmark_models
from effrun.data import BatchLoader, DataSplits, sample_indices
from effrun.errors import EffrunError
from effrun.keys import fingerprint, init_fingerprint, stage_config
from effrun.measure import model_figures
from effrun.models.hooks import InitFromData
from effrun.run_dir import stage_dir_for
from effrun.schema import EffrunConfig, validate
from effrun.stage import ModelRecord, StageInputs, StageResult, stage_inputs
from effrun.summary import fastest_deployable, headline, print_summary, summarize
from effrun.tracking import NoTracking, Tracker

log = logging.getLogger("effrun")
# Training images handed to a model's init_from_data hook (airbench: 5000).
DATA_INIT_IMAGES = 5000


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> list[dict]:
    """Run every stage of a composed config in `run_dir`; returns the summary records.

    Nothing in the run dir changes until the run is accepted: the config is valid, the run
    dir's lock is ours and no finished stage there was made with another config.
    """
    config = validate(cfg)
    distributed.per_rank_batch(config.run.train.batch_size)  # torchrun: the ranks split it
    config.dataset.resolved_loader()  # loader=auto decided here, on every rank (rank 0's)
    run_dir = Path(run_dir)
    records.resume_stages(config)  # resume_from: only the stages after the one it names
    with contextlib.ExitStack() as held:
        # Under torchrun rank 0 alone takes the lock and writes the records; its verdict (or
        # error) reaches every rank.
        distributed.on_main(run_dir_guard.accept_run, held, cfg, config, run_dir, overrides)
        return run_stages(config, run_dir)


def run_stages(config: EffrunConfig, run_dir: Path) -> list[dict]:
    # Tracking opens first: a missing extra or an unreachable server fails before any compute.
    # It only reads what the stages report; it never changes a result.
    tracking = config.tracking if distributed.is_main() else NoTracking()
    with tracking.start(run_dir, config) as tracker:
        hw = config.hardware
        hw.setup(config.run.seed)
        job = distributed.describe()
        log.info("run dir %s | stages %s | device %s%s", run_dir, config.run.stages,
                 hw.torch_device, f" | torchrun {job}" if job else "")
        parent, data = read_artifacts_then_data(config)
        produced: list[ModelRecord] = []
        for stage in config.run.stages:
            if stage == "benchmark":
                continue
            parent = run_model_stage(config, stage, run_dir, data, parent, tracker)
            produced.append(parent)
            tracker.log_stage(stage, parent.metrics)

        bench = None
        if "benchmark" in config.run.stages:
            bench = distributed.on_main(run_benchmark_stage, config, run_dir, data,
                                        produced or [parent])
        summary = summarize(produced or [parent], bench)
        if not distributed.is_main():
            return summary
        fastest = (fastest_deployable(summary, config.run.benchmark.accuracy_tolerance)
                   if bench is not None else None)
        artifacts.write_json({"name": config.run.name, "run_dir": str(run_dir),
                              "records": summary, "headline": headline(summary),
                              "fastest": fastest}, run_dir / "summary.json")
        if bench is not None:
            tracker.log_benchmark(summary)
        print_summary(summary, title=f"effrun · {config.run.name} · {run_dir}",
                      fastest=fastest)
    return summary


def read_artifacts_then_data(config: EffrunConfig) -> tuple[ModelRecord | None, DataSplits]:
    """The init_from record and the data. Every artifact the config names (init_from, a
    distillation teacher) is read before the data is decoded: a bad path fails in seconds."""
    given = config.run.init_from or config.run.resume_from
    parent = initial_record(config) if given else None
    teacher = getattr(config.compression.get("distill"), "teacher", None)
    if teacher and "distill" in config.run.stages:
        try:  # untrusted: a teacher from elsewhere is scanned like init_from
            artifacts.read_meta(Path(teacher))
        except EffrunError as e:
            raise EffrunError(f"compression.distill.teacher: {e}") from None
    data = config.dataset.load(seed=config.run.seed)
    log.info("data: %d train / %s val / %d test images of %s, %d classes", data.num_train,
             len(data.val_y) if data.val_y is not None else 0, len(data.test_y),
             "x".join(map(str, data.image_size)), data.num_classes)
    if parent is not None and parent.num_classes != data.num_classes:
        key = "init_from" if config.run.init_from else "resume_from"
        raise EffrunError(f"{key}={given} has {parent.num_classes} classes "
                          f"but the data has {data.num_classes}")
    return parent, data


def initial_record(config: EffrunConfig) -> ModelRecord:
    """The model init_from or resume_from gives; read like any artifact from elsewhere."""
    if config.run.resume_from:
        sdir, info = records.resumed_stage(Path(config.run.resume_from), verify=False)
        path, fp = sdir / info["artifact"], info["fingerprint"]
    else:
        path, fp = Path(config.run.init_from), init_fingerprint(config)
    meta = artifacts.read_meta(path, trusted=config.run.trust_artifact)
    return ModelRecord(stage=f"init:{meta['stage']}", artifact=path,
                       model_config=meta["model_config"], num_classes=meta["num_classes"],
                       fingerprint=fp)


def run_model_stage(config: EffrunConfig, stage: str, run_dir: Path, data: DataSplits,
                    parent: ModelRecord | None, tracker: Tracker | None = None) -> ModelRecord:
    sdir = stage_dir_for(run_dir, stage)
    scfg = stage_config(config, stage)
    fp = fingerprint({"stage": scfg, "parent": parent.fingerprint if parent else None})
    done = distributed.on_main(records.finished_record, sdir, fp)
    if done is not None:
        log.info("%s: already finished in %s, not run again", stage, sdir)
        return done
    if single_process(config, stage):  # torchrun: rank 0 alone, the others wait
        return distributed.on_main(cached_or_computed, config, stage, sdir, data, parent,
                                   scfg, fp, tracker)
    return cached_or_computed(config, stage, sdir, data, parent, scfg, fp, tracker)


def single_process(config: EffrunConfig, stage: str) -> bool:
    """Whether rank 0 computes `stage` alone under torchrun: quantize and benchmark, except a
    quantize method that trains (int8_qat), whose ranks fine-tune together."""
    method = config.compression.get(stage)
    return (stage in distributed.SINGLE_PROCESS_STAGES
            and not getattr(method, "trains_across_ranks", False))


def cached_or_computed(config: EffrunConfig, stage: str, sdir: Path, data: DataSplits,
                       parent: ModelRecord | None, scfg: dict, fp: str,
                       tracker: Tracker | None) -> ModelRecord:
    """The stage from the stage cache, else computed and stored there. Under torchrun rank 0
    alone reads and writes the cache; on a miss every rank computes."""
    main = distributed.is_main()
    claim = stage_cache.claim(config.run.cache, stage, fp) if main else contextlib.nullcontext()
    with claim as entry:  # other jobs wait here
        cached = distributed.on_main(lambda: entry.restore(sdir, parent) if entry else None)
        if cached is not None:
            return cached
        record = compute_model_stage(config, stage, sdir, data, parent, scfg, fp, tracker)
        if entry:
            entry.store(sdir)
        return record


def compute_model_stage(config: EffrunConfig, stage: str, sdir: Path, data: DataSplits,
                        parent: ModelRecord | None, scfg: dict, fp: str,
                        tracker: Tracker | None) -> ModelRecord:
    started, t0 = artifacts.now_iso(), time.perf_counter()
    inputs = stage_inputs(config, stage, sdir, data, parent=parent, fingerprint=fp,
                          tracker=tracker)
    sdir.mkdir(parents=True, exist_ok=True)
    if stage == "train":
        result = train_stage(config, inputs, parent)
    else:
        model = parent_model(config, data, parent)
        method = config.compression[stage]
        log.info("%s: %s", stage, type(method).__name__)
        result = method(model, inputs)
    # Under torchrun rank 0 holds the result (every rank does after training; a method that
    # finishes on rank 0 alone returns None elsewhere); rank 0 writes it and sends its record.
    return distributed.on_main(write_stage, config, stage, sdir, data, parent, scfg, fp,
                               inputs.model_config, result, started, t0)


def write_stage(config: EffrunConfig, stage: str, sdir: Path, data: DataSplits,
                parent: ModelRecord | None, scfg: dict, fp: str, parent_config: dict,
                result: StageResult, started: str, t0: float) -> ModelRecord:
    """The stage's artifact, exports, metrics.json and stage.json; returns its record."""
    model_config = result.model_config or parent_config
    meta = {"stage": stage, "model_config": model_config, "num_classes": data.num_classes,
            "deploy": result.deploy.to_meta(), "extra": result.artifact_meta}
    artifact = (result.save or save_state_dict(result.model))(sdir, meta)
    figures = result.figures or model_figures(result.model, data.image_size)
    metrics = {"accuracy": result.accuracy, **vars(figures),
               "file_bytes": artifact.stat().st_size, **result.metrics}
    if result.note:
        metrics["note"] = result.note
    log.info("%s: test accuracy %.4f, %d params, artifact %s", stage, result.accuracy,
             figures.params, artifact)
    if config.run.export and stage in export.EXPORT_STAGES and not result.deploy.native:
        shape = (int(data.train_x.shape[1]), *data.image_size)
        metrics["exports"] = export.write_exports(result.model, sdir, config.run.export, shape)
        for fmt, name in metrics["exports"].items():
            log.info("%s: exported %s %s", stage, fmt, sdir / name)
    artifacts.write_json(metrics, sdir / "metrics.json")
    records.write_stage_json(sdir, stage=stage, fp=fp, scfg=scfg, parent=parent,
                             started=started, seconds=time.perf_counter() - t0,
                             artifact=artifact.name, model_config=model_config,
                             num_classes=data.num_classes)
    return ModelRecord(stage=stage, artifact=artifact, model_config=model_config,
                       num_classes=data.num_classes, fingerprint=fp, metrics=metrics)


def parent_model(config: EffrunConfig, data: DataSplits, parent: ModelRecord | None):
    """The model a stage starts from: the parent's artifact, or a fresh one for training."""
    if parent is not None:
        return artifacts.load_model(parent.artifact, trusted=config.run.trust_artifact
                                    or not parent.stage.startswith("init:"))[0]
    model = config.model.build(num_classes=data.num_classes)
    init_from_data(model, data, config.run.seed)
    return model


def train_stage(config: EffrunConfig, inputs: StageInputs, parent: ModelRecord | None
                ) -> StageResult:
    """The train stage: the data it trains on (all of the train split, or the share that
    `select.*` keeps: effrun/select.py), then the spine's loop with the run's settings. Its
    model is built from the kept images only (a model's init_from_data hook sees no others)."""
    data, selection = select.train_data(config, inputs,
                                        lambda: parent_model(config, inputs.data, parent))
    inputs = dataclasses.replace(inputs, data=data)
    model = parent_model(config, data, parent)
    fitted = inputs.fit(model)
    return StageResult(model=model, accuracy=fitted["test_accuracy"],
                       metrics={**fitted, **selection})


def save_state_dict(model: torch.nn.Module):
    """The default saver: effrun's self-describing model.pt."""
    def save(stage_dir: Path, meta: dict) -> Path:
        return artifacts.save_model(model, stage_dir / artifacts.MODEL_FILE, **meta)
    return save


def init_from_data(model, data: DataSplits, seed: int, count: int = DATA_INIT_IMAGES) -> None:
    """Call the model's `init_from_data(images)` hook (effrun.models.hooks), if it has one,
    with `count` seeded random training images normalized as the loader does, before it trains
    from scratch (airbench's whitening conv)."""
    if not isinstance(model, InitFromData):
        return
    pick = sample_indices(len(data.train_y), count, seed)
    images, _ = next(iter(BatchLoader(data.train_x[pick], data.train_y[pick], len(pick),
                                      mean=data.mean, std=data.std)))
    model.init_from_data(images)
    log.info("train: model initialised from %d training images", len(pick))


def run_benchmark_stage(config: EffrunConfig, run_dir: Path, data: DataSplits,
                        models: list[ModelRecord]) -> list:
    sdir = stage_dir_for(run_dir, "benchmark")
    scfg = stage_config(config, "benchmark")
    fp = fingerprint({"stage": scfg, "models": [m.fingerprint for m in models]})
    found = records.finished_benchmark(sdir, fp, models)
    if found is not None:
        log.info("benchmark: already finished in %s, not run again", sdir)
        return found[1]["models"]
    started, t0 = artifacts.now_iso(), time.perf_counter()
    results = benchmark_models(models, data, config, sdir)
    artifacts.write_json({"models": results}, sdir / "metrics.json")
    records.write_stage_json(sdir, stage="benchmark", fp=fp, scfg=scfg, parent=models[-1],
                             started=started, seconds=time.perf_counter() - t0, artifact=None,
                             model_config=None, num_classes=data.num_classes)
    return results
