"""The runner, top to bottom: validate → data → train → prune → distill → quantize → benchmark.

Each model-producing stage is `result = method(model, inputs)` (the contract: effrun/stage.py);
the pipeline writes <run_dir>/<NN>_<stage>/ from the result: the model artifact, metrics.json
and stage.json. A stage whose stage.json says it finished with the same config is not run
again, so rerunning a run dir resumes it; training itself resumes from its last per-epoch
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from effrun import artifacts
from effrun.benchmark import benchmark_models
from effrun.data import BatchLoader, DataSplits, sample_indices
from effrun.errors import EffrunError
from effrun.measure import model_figures
from effrun.models.hooks import InitFromData
from effrun.schema import STAGE_ORDER, EffrunConfig, validate
from effrun.stage import ModelRecord, StageInputs, StageResult, stage_inputs
from effrun.summary import headline, print_summary, summarize

log = logging.getLogger("effrun")
# Training images handed to a model's init_from_data hook (airbench: 5000).
DATA_INIT_IMAGES = 5000


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    """Run every stage of a composed config in `run_dir`; returns the summary records."""
    config = validate(cfg)
    run_dir = Path(run_dir)
    artifacts.write_json(OmegaConf.to_container(cfg, resolve=True), run_dir / "config.json")
    hw = config.hardware
    hw.setup(config.run.seed)
    log.info("run dir %s | stages %s | device %s", run_dir, config.run.stages, hw.torch_device)
    data = config.dataset.load(seed=config.run.seed)
    log.info("data: %d train / %s val / %d test images of %s, %d classes", len(data.train_y),
             len(data.val_y) if data.val_y is not None else 0, len(data.test_y),
             "x".join(map(str, data.image_size)), data.num_classes)

    parent = initial_record(config) if config.run.init_from else None
    records: list[ModelRecord] = []
    for stage in config.run.stages:
        if stage == "benchmark":
            continue
        parent = run_model_stage(config, stage, run_dir, data, parent)
        records.append(parent)

    bench = None
    if "benchmark" in config.run.stages:
        bench = run_benchmark_stage(config, run_dir, data, records or [parent])
    summary = summarize(records or [parent], bench)
    artifacts.write_json({"name": config.run.name, "run_dir": str(run_dir), "records": summary,
                          "headline": headline(summary)}, run_dir / "summary.json")
    print_summary(summary, title=f"effrun · {config.run.name} · {run_dir}")
    return summary


def stage_dir_for(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{STAGE_ORDER.index(stage) + 1:02d}_{stage}"


def stage_config(config: EffrunConfig, stage: str) -> dict:
    """The part of the config a stage's result depends on (its resume fingerprint)."""
    c = OmegaConf.to_container(config.raw, resolve=True)
    common = {"train": c["train"], "optimizer": c["optimizer"],
              "augmentation": c["augmentation"], "precision": c["hardware"]["precision"],
              "seed": c["seed"], "dataset": c["dataset"]}
    if stage == "train":
        return {**common, "model": c["model"], "init_from": c.get("init_from")}
    if stage == "benchmark":
        return {"benchmark": c["benchmark"], "hardware": c["hardware"], "dataset": c["dataset"]}
    return {**common, "compression": c["compression"][stage]}


def fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def initial_record(config: EffrunConfig) -> ModelRecord:
    meta = artifacts.read_meta(Path(config.run.init_from))
    return ModelRecord(stage=f"init:{meta['stage']}", artifact=Path(config.run.init_from),
                       model_config=meta["model_config"], num_classes=meta["num_classes"],
                       fingerprint=fingerprint({"init_from": str(config.run.init_from)}))


def finished_record(stage_dir: Path, fp: str) -> ModelRecord | None:
    """The record of a stage that already finished in this run dir, if its config matches."""
    info_path = stage_dir / "stage.json"
    if not info_path.exists():
        return None
    info = artifacts.read_json(info_path)
    if info.get("fingerprint") != fp:
        raise EffrunError(f"{stage_dir} holds a finished {info.get('stage')!r} stage made with "
                          f"a different config: use a new hydra.run.dir")
    return ModelRecord(stage=info["stage"], artifact=stage_dir / info["artifact"],
                       model_config=info["model_config"], num_classes=info["num_classes"],
                       fingerprint=fp, metrics=artifacts.read_json(stage_dir / "metrics.json"))


def run_model_stage(config: EffrunConfig, stage: str, run_dir: Path, data: DataSplits,
                    parent: ModelRecord | None) -> ModelRecord:
    sdir = stage_dir_for(run_dir, stage)
    scfg = stage_config(config, stage)
    fp = fingerprint({"stage": scfg, "parent": parent.fingerprint if parent else None})
    done = finished_record(sdir, fp)
    if done is not None:
        log.info("%s: already finished in %s, not run again", stage, sdir)
        return done
    started, t0 = artifacts.now_iso(), time.perf_counter()
    inputs = stage_inputs(config, stage, sdir, data, parent=parent, fingerprint=fp)
    sdir.mkdir(parents=True, exist_ok=True)
    model = parent_model(config, data, parent)
    if stage == "train":
        result = train_stage(model, inputs)
    else:
        method = config.compression[stage]
        log.info("%s: %s", stage, type(method).__name__)
        result = method(model, inputs)

    model_config = result.model_config or inputs.model_config
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
    artifacts.write_json(metrics, sdir / "metrics.json")
    write_stage_json(sdir, stage=stage, fp=fp, scfg=scfg, parent=parent, started=started,
                     seconds=time.perf_counter() - t0, artifact=artifact.name,
                     model_config=model_config, num_classes=data.num_classes)
    return ModelRecord(stage=stage, artifact=artifact, model_config=model_config,
                       num_classes=data.num_classes, fingerprint=fp, metrics=metrics)


def parent_model(config: EffrunConfig, data: DataSplits, parent: ModelRecord | None):
    """The model a stage starts from: the parent's artifact, or a fresh one for training."""
    if parent is not None:
        return artifacts.load_model(parent.artifact)[0]
    model = config.model.build(num_classes=data.num_classes)
    init_from_data(model, data, config.run.seed)
    return model


def train_stage(model: torch.nn.Module, inputs: StageInputs) -> StageResult:
    """The train stage: the spine's loop with the run's settings."""
    fitted = inputs.fit(model)
    return StageResult(model=model, accuracy=fitted["test_accuracy"], metrics=fitted)


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
                        records: list[ModelRecord]) -> list:
    sdir = stage_dir_for(run_dir, "benchmark")
    scfg = stage_config(config, "benchmark")
    fp = fingerprint({"stage": scfg, "models": [m.fingerprint for m in records]})
    if (sdir / "stage.json").exists() and artifacts.read_json(sdir / "stage.json").get(
            "fingerprint") == fp:
        log.info("benchmark: already finished in %s, not run again", sdir)
        return artifacts.read_json(sdir / "metrics.json")["models"]
    started, t0 = artifacts.now_iso(), time.perf_counter()
    results = benchmark_models(records, data, config)
    artifacts.write_json({"models": results}, sdir / "metrics.json")
    write_stage_json(sdir, stage="benchmark", fp=fp, scfg=scfg, parent=records[-1],
                     started=started, seconds=time.perf_counter() - t0, artifact=None,
                     model_config=None, num_classes=data.num_classes)
    return results


def write_stage_json(sdir: Path, *, stage, fp, scfg, parent, started, seconds, artifact,
                     model_config, num_classes) -> None:
    artifacts.write_json({
        "stage": stage, "status": "finished", "fingerprint": fp, "config": scfg,
        "parent": None if parent is None else {"stage": parent.stage,
                                               "artifact": str(parent.artifact)},
        "artifact": artifact, "model_config": model_config, "num_classes": num_classes,
        "started": started, "finished": artifacts.now_iso(), "seconds": round(seconds, 3),
        "versions": artifacts.versions(), "git_sha": artifacts.git_sha(),
    }, sdir / "stage.json")
