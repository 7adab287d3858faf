"""What a stage's result depends on, as a key: its fingerprint.

One key serves resuming (a finished stage in the run dir with the same fingerprint is not run
again, effrun/records.py) and the stage cache (effrun/cache.py). A stage's key hashes the part
of the resolved config its result depends on (`stage_config`) chained with its parent's key,
so changing a compression setting changes that stage's key and every later one, not train's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from effrun import artifacts, distributed, records
from effrun.data.augment import POLICY_AND_MIX_DEFAULTS
from effrun.data.splits import SUBSET_DEFAULTS
from effrun.export import EXPORT_STAGES


def fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_config(config, stage: str) -> dict:
    """The part of the config a stage's result depends on: its fingerprint, for resuming and as
    its stage-cache key. Only what changes the result: the device type and the resolved precision
    (`auto` differs by machine), not where files live (dataset.cache_dir), whether to download,
    or how fast it runs (compile, threads, memory format). Files (init_from, a teacher) count
    by content: init_from through the parent fingerprint, a teacher by its sha256."""
    c = OmegaConf.to_container(config.raw, resolve=True)
    # dataset.workers only changes speed (stream draws per sample from seed, epoch and index);
    # the loader counts as what it runs (auto decided: another machine may decide otherwise);
    # loader=memory, the only loader before it existed, is left out so older keys stay the same.
    c["dataset"]["loader"] = config.dataset.resolved_loader()
    dataset = {k: v for k, v in c["dataset"].items() if k not in ("cache_dir", "download")
               and not (k in SUBSET_DEFAULTS and v == SUBSET_DEFAULTS[k])
               and k != "workers" and not (k == "loader" and v == "memory")}
    # Policy and mix keys at their defaults are left out too (keys made before them stay).
    augmentation = {k: v for k, v in c["augmentation"].items()
                    if not (k in POLICY_AND_MIX_DEFAULTS and v == POLICY_AND_MIX_DEFAULTS[k])}
    # How often training checkpoints changes nothing it computes (a resume continues exactly):
    # turning it on to resume a long run must find that run's finished stages.
    train = {k: v for k, v in c["train"].items() if k != "checkpoint_every"}
    common = {"train": train, "optimizer": c["optimizer"],
              "augmentation": augmentation, "precision": config.hardware.resolved_precision,
              "device": config.hardware.torch_device.type, "seed": c["seed"], "dataset": dataset}
    if stage == "benchmark":
        return {"benchmark": c["benchmark"], "hardware": c["hardware"], "dataset": c["dataset"]}
    if distributed.job_size() > 1 and not config.hardware.sync_bn:
        # Each rank's BatchNorm layers see only its share of the batch: another result than
        # one process's (with sync_bn the ranks compute that, up to float rounding).
        common["batchnorm_ranks"] = distributed.job_size()
    if config.run.export and stage in EXPORT_STAGES:
        # The exported files are part of the stage's outputs: a stage finished (or cached)
        # without them must not stand in for one that writes them. Only when set, so every
        # key made before the key existed stays the same.
        common["export"] = sorted(config.run.export)
    if stage == "train":
        # Data pruning changes what train trains on; only when it keeps a share (keep < 1):
        # keys made before select existed stay the same, and keep=1 of any method is one key.
        selected = config.run.select.key()
        return {**common, "model": c["model"], **({} if selected is None else
                                                  {"select": selected})}
    method = dict(c["compression"][stage])
    if method.get("teacher"):
        method["teacher"] = content_id(method["teacher"])
    return {**common, "compression": method}


def start_fingerprint(config) -> str | None:
    """The fingerprint the first stage chains to: init_from's content, resume_from's stored
    fingerprint (so the stages after it key as in a run that made them all), or None."""
    if config.run.resume_from:
        return records.resumed_stage(Path(config.run.resume_from), verify=False)[1]["fingerprint"]
    return init_fingerprint(config) if config.run.init_from else None


def init_fingerprint(config) -> str:
    return fingerprint({"init_from": content_id(config.run.init_from)})


def content_id(path: str) -> str:
    """A file named in the config, by content (sha256): the same weights key the same in any
    folder, on any machine; by path while it cannot be read (reading it fails later)."""
    try:
        return "sha256:" + artifacts.sha256_file(Path(path))
    except OSError:
        return f"path:{path}"
