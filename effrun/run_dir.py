"""What guards a run dir: one effrun at a time (a lock naming its holder), and records written
only once a run is accepted (valid config, lock taken, no finished stage made with another
config), with every invocation's overrides kept as history; and where each stage's directory
lies in it (`stage_dir_for`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from effrun import artifacts
from effrun.errors import EffrunError
from effrun.keys import fingerprint, stage_config, start_fingerprint
from effrun.schema import STAGE_ORDER, EffrunConfig

LOCK_FILE = ".effrun.lock"
HISTORY_FILE = "invocations.jsonl"


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's lock (flock: released by the OS when the process dies, kill -9
    included); a run dir in use by another process is one line naming its PID. A run dir that
    cannot be created or written (a file at its path, read-only) is one line naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_FILE, "a+")
    except OSError as err:
        mapped = artifacts.write_error(err, run_dir)
        if mapped is None:
            raise
        raise mapped from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise EffrunError(f"{run_dir} is in use by another effrun (pid {holder}): wait for "
                              f"it to finish or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_records(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> None:
    """config.json (the resolved config) and one line of history per accepted invocation."""
    artifacts.write_json(OmegaConf.to_container(cfg, resolve=True), run_dir / "config.json")
    entry = {"time": artifacts.now_iso(), "pid": os.getpid(), "overrides": overrides or []}
    with open(run_dir / HISTORY_FILE, "a") as history:
        history.write(json.dumps(entry) + "\n")


def accept_run(held: contextlib.ExitStack, cfg: DictConfig, config: EffrunConfig,
               run_dir: Path, overrides: list[str] | None) -> None:
    """Take the run dir's lock (held until `held` closes), refuse a finished stage made with
    another config, then write the run's records."""
    held.enter_context(locked(run_dir))
    refuse_changed_stages(config, run_dir)
    write_records(cfg, run_dir, overrides)


def refuse_changed_stages(config: EffrunConfig, run_dir: Path) -> None:
    """Before anything is written: a finished model stage in this run dir whose config differs
    from this run's is refused (one line), as the stage itself would refuse it mid-run."""
    parent_fp = start_fingerprint(config)
    for stage in config.run.stages:
        if stage == "benchmark":
            continue
        fp = fingerprint({"stage": stage_config(config, stage), "parent": parent_fp})
        info_path = stage_dir_for(run_dir, stage) / "stage.json"
        try:
            finished = artifacts.read_json(info_path).get("fingerprint")
        except (OSError, ValueError):  # absent or unreadable: the stage runs (again)
            finished = None
        if finished not in (None, fp):
            raise EffrunError(f"{info_path.parent} holds a finished {stage!r} stage made with a "
                              f"different config: use a new hydra.run.dir")
        parent_fp = fp


def stage_dir_for(run_dir: Path, stage: str) -> Path:
    return run_dir / f"{STAGE_ORDER.index(stage) + 1:02d}_{stage}"
