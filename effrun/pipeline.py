"""The runner, top to bottom: validate → data → train → prune → distill → quantize → benchmark.

Each stage writes <run_dir>/<NN>_<stage>/ with its model artifact, metrics.json and stage.json.
A stage whose stage.json says it finished with the same config is not run again, so rerunning a
run dir resumes it; training itself resumes from its last per-epoch checkpoint.
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
from effrun.context import ModelRecord, StageContext
from effrun.data import BatchLoader
from effrun.models import model_config_dict
from effrun.measure import count_flops, count_params
from effrun.schema import STAGE_ORDER, ConfigError, Resolved, validate
from effrun.summary import print_summary, summarize

log = logging.getLogger("effrun")
# Training images handed to a model's optional init_from_data hook (airbench: 5000).
DATA_INIT_IMAGES = 5000


def run(cfg: DictConfig, run_dir: Path) -> list[dict]:
    r = validate(cfg)
    run_dir = Path(run_dir)
    artifacts.write_json(OmegaConf.to_container(cfg, resolve=True), run_dir / "config.json")
    hw = r.hardware
    hw.setup(r.run.seed)
    log.info("run dir %s | stages %s | device %s", run_dir, r.run.stages, hw.torch_device)
    data = r.dataset.load(seed=r.run.seed)
    log.info("data: %d train / %s val / %d test images of %s, %d classes", len(data.train_y),
             len(data.val_y) if data.val_y is not None else 0, len(data.test_y),
             "x".join(map(str, data.image_size)), data.num_classes)

    parent = initial_record(r) if r.run.init_from else None
    records: list[ModelRecord] = []
    for stage in r.run.stages:
        if stage == "benchmark":
            continue
        parent = run_model_stage(r, stage, run_dir, data, parent)
        records.append(parent)

    bench = None
    if "benchmark" in r.run.stages:
        bench = run_benchmark_stage(r, run_dir, data, records or [parent])
    summary = summarize(records or [parent], bench)
    artifacts.write_json({"name": r.run.name, "run_dir": str(run_dir), "records": summary},
                         run_dir / "summary.json")
    print_summary(summary, title=f"effrun · {r.run.name} · {run_dir}")
    return summary


def stage_dir_for(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{STAGE_ORDER.index(stage) + 1:02d}_{stage}"


def stage_config(r: Resolved, stage: str) -> dict:
    """The part of the config a stage's result depends on (its resume fingerprint)."""
    c = OmegaConf.to_container(r.raw, resolve=True)
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


def initial_record(r: Resolved) -> ModelRecord:
    meta = artifacts.read_meta(Path(r.run.init_from))
    return ModelRecord(stage=f"init:{meta['stage']}", artifact=Path(r.run.init_from),
                       model_config=meta["model_config"], num_classes=meta["num_classes"],
                       fingerprint=fingerprint({"init_from": str(r.run.init_from)}))


def finished_record(stage_dir: Path, fp: str) -> ModelRecord | None:
    """The record of a stage that already finished in this run dir, if its config matches."""
    info_path = stage_dir / "stage.json"
    if not info_path.exists():
        return None
    info = artifacts.read_json(info_path)
    if info.get("fingerprint") != fp:
        raise ConfigError(f"{stage_dir} holds a finished {info.get('stage')!r} stage made with a "
                          f"different config: use a new hydra.run.dir")
    return ModelRecord(stage=info["stage"], artifact=stage_dir / info["artifact"],
                       model_config=info["model_config"], num_classes=info["num_classes"],
                       fingerprint=fp, metrics=artifacts.read_json(stage_dir / "metrics.json"))


def run_model_stage(r: Resolved, stage: str, run_dir: Path, data, parent: ModelRecord | None
                    ) -> ModelRecord:
    sdir = stage_dir_for(run_dir, stage)
    scfg = stage_config(r, stage)
    fp = fingerprint({"stage": scfg, "parent": parent.fingerprint if parent else None})
    done = finished_record(sdir, fp)
    if done is not None:
        log.info("%s: already finished in %s, not run again", stage, sdir)
        return done
    started, t0 = artifacts.now_iso(), time.perf_counter()
    ctx = StageContext(cfg=r, stage=stage, stage_dir=sdir, data=data, hw=r.hardware,
                       fingerprint=fp, parent=parent,
                       model_config=parent.model_config if parent else model_config_dict(r.model))
    sdir.mkdir(parents=True, exist_ok=True)
    if parent is not None:
        model, _ = artifacts.load_model(parent.artifact)
    else:
        model = r.model.build(num_classes=data.num_classes)
        init_from_data(model, data, r.run.seed)
    if stage == "train":
        result = ctx.fit(model)
        ctx.metrics.update(result)
        ctx.metrics["accuracy"] = result["test_accuracy"]
        method = None
    else:
        method = r.compression[stage]
        log.info("%s: %s", stage, type(method).__name__)
        model = method(model, ctx)
        if "accuracy" not in ctx.metrics:
            ctx.metrics["accuracy"] = ctx.evaluate(model)["accuracy"]
    save = getattr(method, "save", None)
    if save is not None:  # methods whose artifact is not a state_dict (e.g. exported int8)
        artifact = Path(save(model, sdir, ctx))
    else:
        artifact = artifacts.save_model(model, sdir / artifacts.MODEL_FILE,
                                        model_config=ctx.model_config,
                                        num_classes=data.num_classes, stage=stage,
                                        extra=ctx.artifact_extra)
    ctx.metrics.setdefault("params", count_params(model))
    ctx.metrics.setdefault("flops", _flops(model, data, r))
    # A method may report the bytes its deployed graph uses (e.g. int8 weights + scales);
    # the file size is always reported beside it.
    ctx.metrics.setdefault("size_bytes", artifact.stat().st_size)
    ctx.metrics["artifact_bytes"] = artifact.stat().st_size
    log.info("%s: test accuracy %.4f, %d params, artifact %s", stage, ctx.metrics["accuracy"],
             ctx.metrics["params"], artifact)
    artifacts.write_json(ctx.metrics, sdir / "metrics.json")
    write_stage_json(sdir, stage=stage, fp=fp, scfg=scfg, parent=parent, started=started,
                     seconds=time.perf_counter() - t0, artifact=artifact.name,
                     model_config=ctx.model_config, num_classes=data.num_classes)
    return ModelRecord(stage=stage, artifact=artifact, model_config=ctx.model_config,
                       num_classes=data.num_classes, fingerprint=fp, metrics=ctx.metrics)


def init_from_data(model, data, seed: int, count: int = DATA_INIT_IMAGES) -> None:
    """Call the optional model hook `init_from_data(images)` with `count` training images picked
    at random (seeded), normalized as the loader does, before a model trains from scratch.
    Models use it for data-dependent initialisation (airbench's whitening conv)."""
    hook = getattr(model, "init_from_data", None)
    if hook is None:
        return
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.train_y), generator=generator)[:count]
    images, _ = next(iter(BatchLoader(data.train_x[pick], data.train_y[pick], len(pick),
                                      mean=data.mean, std=data.std)))
    hook(images)
    log.info("train: model initialised from %d training images", len(pick))


def run_benchmark_stage(r: Resolved, run_dir: Path, data, records: list[ModelRecord]) -> list:
    sdir = stage_dir_for(run_dir, "benchmark")
    scfg = stage_config(r, "benchmark")
    fp = fingerprint({"stage": scfg, "models": [m.fingerprint for m in records]})
    if (sdir / "stage.json").exists() and artifacts.read_json(sdir / "stage.json").get(
            "fingerprint") == fp:
        log.info("benchmark: already finished in %s, not run again", sdir)
        return artifacts.read_json(sdir / "metrics.json")["models"]
    started, t0 = artifacts.now_iso(), time.perf_counter()
    results = benchmark_models(records, data, r)
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


def _flops(model, data, r: Resolved) -> int | None:
    try:
        device = next(model.parameters()).device
        return count_flops(model, (1, 3, *data.image_size)) if device.type != "meta" else None
    except Exception as e:  # some exported/quantized graphs cannot be counted; say so, go on
        log.warning("FLOPs not counted for this model: %s", str(e).splitlines()[0])
        return None
