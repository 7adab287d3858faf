"""The record a finished stage leaves (stage.json) and the checks before a rerun trusts it.

stage.json is written last and marks its stage finished; it holds the stage's config
fingerprint and the sha256 of every output a later run relies on. A finished stage is reused
only when its fingerprint matches and those outputs are there unchanged; otherwise it runs
again, after one warning line saying why (a finished stage of another config is refused).
resume_from reads another run's finished stage the same way, but only reads: a damaged one is
refused in one line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from effrun import artifacts
from effrun.errors import EffrunError
from effrun.schema import STAGE_ORDER
from effrun.stage import ModelRecord

log = logging.getLogger("effrun")


def finished_record(stage_dir: Path, fp: str) -> ModelRecord | None:
    """The record of a stage that already finished in this run dir, if its config matches and
    its outputs are there as they were written (else None, after one warning line saying why:
    the stage runs again)."""
    found = _finished_stage(stage_dir, fp, refuse_other_config=True,
                            required=("stage", "artifact", "model_config", "num_classes"))
    if found is None:
        return None
    info, metrics = found
    return ModelRecord(stage=info["stage"], artifact=stage_dir / info["artifact"],
                       model_config=info["model_config"], num_classes=info["num_classes"],
                       fingerprint=fp, metrics=metrics)


def finished_benchmark(sdir: Path, fp: str, models: list[ModelRecord]
                       ) -> tuple[dict, dict] | None:
    """(stage.json, metrics.json) of a benchmark that finished with fingerprint `fp` and
    measured exactly these model files; else None (it measures again)."""
    found = _finished_stage(sdir, fp, refuse_other_config=False)
    if found is not None and (why := _remeasure_reason(sdir, *found, models)) is not None:
        return _run_again(sdir, why)
    return found


def write_stage_json(sdir: Path, *, stage, fp, scfg, parent, started, seconds, artifact,
                     model_config, num_classes) -> None:
    """The stage's record, written last: it marks the stage finished. `sha256` holds the
    digest of each output a later run relies on: the artifact and the files its saver wrote
    beside it (`<stem>_*`, e.g. quantize's model_aoti.pt2, and `<stem>.*`, an IR's .bin);
    for the benchmark, metrics.json, and `measured_sha256` the digest of each artifact it
    measured, by stage."""
    measured = None
    if artifact is not None:
        stem = Path(artifact).stem
        # `<stem>.*`: an artifact in several files, e.g. an OpenVINO IR's .xml and its .bin.
        names = [artifact, *sorted(p.name for p in [*sdir.glob(f"{stem}_*"),
                                                    *sdir.glob(f"{stem}.*")]
                                   if p.is_file() and p.name != artifact)]
    else:
        names = [n for n in ("metrics.json",) if (sdir / n).is_file()]
        models = (_read_record(sdir / "metrics.json") or {}).get("models") or []
        measured = {m["stage"]: artifacts.sha256_file(m["artifact"]) for m in models
                    if Path(m.get("artifact", "")).is_file() and "stage" in m}
    artifacts.write_json({
        "stage": stage, "status": "finished", "fingerprint": fp, "config": scfg,
        "parent": None if parent is None else {"stage": parent.stage,
                                               "artifact": str(parent.artifact)},
        "artifact": artifact, "model_config": model_config, "num_classes": num_classes,
        "sha256": {n: artifacts.sha256_file(sdir / n) for n in names},
        **({} if measured is None else {"measured_sha256": measured}),
        "started": started, "finished": artifacts.now_iso(), "seconds": round(seconds, 3),
        "versions": artifacts.versions(), "git_sha": artifacts.git_sha(),
    }, sdir / "stage.json")


def resume_stages(config) -> None:
    """resume_from (of a validated EffrunConfig): check the stage it names (intact, made with
    the same model) and keep only the configured stages after it."""
    if config.run.resume_from is None:
        return
    where = f"resume_from={config.run.resume_from}"
    sdir, info = resumed_stage(Path(config.run.resume_from))
    refuse_other_model(where, sdir.parent, OmegaConf.to_container(config.raw.model, resolve=True))
    later = [s for s in config.run.stages
             if STAGE_ORDER.index(s) > STAGE_ORDER.index(info["stage"])]
    if not later:
        raise EffrunError(f"{where} holds a finished {info['stage']!r} stage and no stage of "
                          f"{config.run.stages} comes after it")
    log.info("resume_from: %s (%s) continues with %s", sdir, info["stage"], later)
    config.run.stages = later


def resumed_stage(path: Path, verify: bool = True) -> tuple[Path, dict]:
    """resume_from: (stage dir, its stage.json) of a finished model stage dir, or of a run dir's
    last finished model stage. With `verify`, every output stage.json records must be there
    unchanged. Read only: a damaged stage is one line, never repaired (it is another run's)."""
    where = f"resume_from={path}"
    path = Path(path)
    if not path.is_dir():
        raise EffrunError(f"{where}: no such directory (give a run dir or a stage dir in it)")
    sdir = path
    if not (path / "stage.json").is_file():  # a run dir: its last finished model stage
        dirs = [path / f"{i + 1:02d}_{s}" for i, s in enumerate(STAGE_ORDER) if s != "benchmark"]
        finished = [d for d in dirs if (d / "stage.json").is_file()]
        if not finished:
            raise EffrunError(f"{where}: no finished model stage in it (no NN_<stage>/stage.json)")
        sdir = finished[-1]
    info = _read_record(sdir / "stage.json")
    if (info is None or info.get("status") != "finished" or not info.get("artifact")
            or any(k not in info for k in ("stage", "fingerprint", "num_classes"))):
        raise EffrunError(f"{where}: {_rel(sdir / 'stage.json')} is not the record of a "
                          f"finished model stage")
    for name, recorded in (info.get("sha256") or {}).items() if verify else ():
        if not (sdir / name).is_file():
            raise EffrunError(f"{where}: {_rel(sdir / name)} is missing")
        if artifacts.sha256_file(sdir / name) != recorded:
            raise EffrunError(f"{where}: {_rel(sdir / name)} changed since it was written")
    return sdir, info


def refuse_other_model(where: str, run_dir: Path, composed: dict) -> None:
    """One line naming both models when the run that made a stage composed another model
    than this config (only the keys that differ are shown)."""
    try:
        stored = artifacts.read_json(run_dir / "config.json")["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EffrunError(f"{where}: {run_dir}/config.json is missing or holds no model: "
                          f"not a run dir effrun wrote") from None
    differ = sorted(k for k in stored.keys() | composed.keys() if stored.get(k) != composed.get(k))
    if differ:
        def show(model: dict) -> str:
            return "{" + ", ".join(f"{k}: {model.get(k, '<absent>')}" for k in differ) + "}"
        raise EffrunError(f"{where} holds model {show(stored)} but the config composes "
                          f"{show(composed)}")


def _finished_stage(sdir: Path, fp: str, *, refuse_other_config: bool,
                    required: tuple[str, ...] = ()) -> tuple[dict, dict] | None:
    """(stage.json, metrics.json) of the stage that finished in `sdir` with fingerprint `fp`,
    when both read and every output stage.json records is there unchanged; else None (after
    one warning line when there was something to distrust). A finished stage of another config
    is refused with `refuse_other_config`, else simply run again."""
    info_path = sdir / "stage.json"
    if not info_path.exists():
        return None
    info = _read_record(info_path)
    if (info is None or any(k not in info for k in required)
            or not isinstance(info.get("sha256", {}), dict)):
        return _run_again(sdir, f"{_rel(info_path)} is not a valid stage record (truncated?)")
    if info.get("fingerprint") != fp:
        if refuse_other_config:
            raise EffrunError(f"{sdir} holds a finished {info.get('stage')!r} stage made with "
                              f"a different config: use a new hydra.run.dir")
        return None
    digests = info.get("sha256")
    if digests is None:  # written before digests were recorded: the artifact must exist
        digests = {info["artifact"]: None} if info.get("artifact") else {}
    for name, recorded in digests.items():
        path = sdir / name
        if not path.is_file():
            return _run_again(sdir, f"{_rel(path)} is missing")
        if recorded is not None and (actual := artifacts.sha256_file(path)) != recorded:
            return _run_again(sdir, f"{_rel(path)} changed since it was written (sha256 "
                                    f"{actual[:12]}…, recorded {recorded[:12]}…)")
    metrics_path = sdir / "metrics.json"
    if not metrics_path.is_file():
        return _run_again(sdir, f"{_rel(metrics_path)} is missing")
    metrics = _read_record(metrics_path)
    if metrics is None:
        return _run_again(sdir, f"{_rel(metrics_path)} is not valid JSON (truncated?)")
    return info, metrics


def _remeasure_reason(sdir: Path, info: dict, metrics: dict,
                      records: list[ModelRecord]) -> str | None:
    """Why a finished benchmark no longer describes the run's models, or None: its metrics
    lack the models, or a model's artifact is not the file it measured (its stage ran again
    and wrote different bytes)."""
    if not isinstance(metrics.get("models"), list):
        return f"{_rel(sdir / 'metrics.json')} holds no benchmark results"
    measured = info.get("measured_sha256") or {}  # absent in records written before it
    for rec in records:
        recorded = measured.get(rec.stage)
        if recorded is None:
            continue
        path = Path(rec.artifact)
        if not path.is_file() or artifacts.sha256_file(path) != recorded:
            return f"{_rel(path)} is not the file {sdir.name} measured"
    return None


def _run_again(sdir: Path, why: str) -> None:
    """Say why a finished stage runs again, and drop its stage.json first, so an interruption
    cannot leave a record pointing at outputs that are gone."""
    log.warning("%s: running the stage again", why)
    (sdir / "stage.json").unlink(missing_ok=True)
    return None


def _read_record(path: Path) -> dict | None:
    """A JSON object from `path`; None when the file is missing, unreadable or torn."""
    try:
        obj = artifacts.read_json(path)
    except (OSError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None
    return obj if isinstance(obj, dict) else None


def _rel(path: Path) -> str:
    """`path` as <stage dir>/<file>, the way the warnings name it."""
    return f"{path.parent.name}/{path.name}"

