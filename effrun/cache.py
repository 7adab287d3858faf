"""The stage cache: a finished model stage's outputs kept across runs, keyed by its fingerprint.

A stage's fingerprint (effrun.keys.stage_config: its resolved config, chained with its
parent's fingerprint) names an entry `<cache.dir>/<stage>-<key>/`: the artifact, the files its
saver wrote beside it (`<stem>_*`), metrics.json and stage.json, plus manifest.json (the sha256
of each of those files, who created it, the effrun and torch versions) and users.jsonl (one
line per run that reused it). Training checkpoints are not kept: a hit needs only the result.

- Entries are written into a temp dir inside cache.dir and renamed into place: a reader never
  sees half an entry. Storing hard-links the run's files where the file system allows (else
  copies them): effrun never rewrites a finished file in place (every write is temp file +
  rename, which gives the path a new inode), so storing costs no disk and no time, and a file
  someone edits in place anyway fails its sha256 on the next read (the entry is dropped).
  Reusing copies: run dirs stay independent of each other, so an in-place edit in one run dir
  can never change another run's files.
- Every read checks the manifest: a missing file, a sha256 mismatch or a torn manifest is one
  warning line, the entry is removed and the stage computed again, never used.
- Jobs needing the same entry serialize on `fcntl.flock` of `<entry>.lock` (released by the OS
  when a process dies): the first computes and stores, the others wait, then find the entry.
- An entry made by another effrun or torch version is stale: computed again and replaced (the
  key holds the config, not the code; after editing effrun itself, `effrun-cache prune --all`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig

import effrun
from effrun import artifacts, records
from effrun.errors import EffrunError
from effrun.stage import ModelRecord

log = logging.getLogger("effrun")
MANIFEST = "manifest.json"
USERS = "users.jsonl"


def cache_dir(configured: str) -> Path:
    """cache.dir as an absolute path: a relative one is relative to the directory effrun was
    launched from, also when a Hydra job changes into its run dir (hydra.job.chdir=true)."""
    path = Path(configured).expanduser()
    if path.is_absolute():
        return path
    launch = Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()
    return launch / path


def entry_path(root: Path, stage: str, key: str) -> Path:
    return Path(root) / f"{stage}-{key}"


class Entry:
    """One cache entry, held under its lock (see `claim`)."""

    def __init__(self, root: Path, stage: str, key: str):
        self.root, self.stage, self.key = Path(root), stage, key
        self.path = entry_path(root, stage, key)

    def restore(self, sdir: Path, parent: ModelRecord | None) -> ModelRecord | None:
        """Put the entry's files into the stage dir and return the stage's record; None when
        there is no usable entry (a damaged one is removed, after one warning line)."""
        files = self._verified_files()
        if files is None:
            return None
        sdir.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name != "stage.json":  # unlinked first: it may be a link into an entry
                (sdir / name).unlink(missing_ok=True)
                shutil.copyfile(self.path / name, sdir / name)
        info = artifacts.read_json(self.path / "stage.json")
        info["parent"] = None if parent is None else {"stage": parent.stage,
                                                      "artifact": str(parent.artifact)}
        info["cache"] = {"hit": True, "entry": str(self.path), "key": self.key}
        artifacts.write_json(info, sdir / "stage.json")
        record = records.finished_record(sdir, self.key)
        if record is not None:
            _append_user(self.path, sdir.parent)
            log.info("%s: reused from cache entry %s (%s)", self.stage, self.key, self.path)
        return record

    def store(self, sdir: Path) -> None:
        """Keep the finished stage in `sdir` as this entry; its stage.json then says where. A
        cache that cannot be written (full disk, permissions) is one warning: the run goes on."""
        info = artifacts.read_json(sdir / "stage.json")
        try:
            self._write(sdir, info)
        except (OSError, EffrunError) as err:
            log.warning("%s: not stored in the stage cache %s (%s)", self.stage, self.root, err)
            return
        info["cache"] = {"hit": False, "stored": str(self.path)}
        artifacts.write_json(info, sdir / "stage.json")
        log.info("%s: stored in cache entry %s (%s)", self.stage, self.key, self.path)

    def _write(self, sdir: Path, info: dict) -> None:
        names = [*info.get("sha256", {}), "metrics.json", "stage.json"]
        for leftover in self.root.glob(f".tmp-{self.path.name}-*"):  # a store that died
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{self.path.name}-"))
        try:
            umask = os.umask(0)  # mkdtemp's 0700 would hide a shared cache from the others
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            for name in names:
                _link_or_copy(sdir / name, tmp / name)
            artifacts.write_json({
                "key": self.key, "stage": self.stage, "created": artifacts.now_iso(),
                "created_by": str(sdir.parent.resolve()), "versions": _versions(),
                "files": {n: artifacts.sha256_file(tmp / n) for n in names},
            }, tmp / MANIFEST)
            _append_user(tmp, sdir.parent)
            shutil.rmtree(self.path, ignore_errors=True)  # a stale entry (we hold its lock)
            os.rename(tmp, self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _verified_files(self) -> list[str] | None:
        """The entry's file names when the manifest vouches for each of them; else None."""
        if not self.path.exists():
            return None
        manifest = _read_manifest(self.path)
        why = _damage(self.path, manifest, self.key)
        if why is not None:
            log.warning("stage cache entry %s is damaged (%s): removed, computing %s again",
                        self.path, why, self.stage)
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        if manifest.get("versions") != _versions():
            log.info("%s: cache entry %s was made with %s: computing it again", self.stage,
                     self.key, manifest.get("versions"))
            shutil.rmtree(self.path, ignore_errors=True)
            return None
        return list(manifest["files"])


@contextmanager
def claim(cfg, stage: str, key: str) -> Iterator[Entry | None]:
    """Hold the entry of (`stage`, `key`) while the stage is looked up, computed and stored;
    None when the cache is off. Another job holding it is waited for (one log line)."""
    if not cfg.enabled:
        yield None
        return
    root = cache_dir(cfg.dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(entry_path(root, stage, key).with_suffix(".lock"), "a+")
    except OSError as err:
        mapped = artifacts.write_error(err, root)
        if mapped is None:
            raise
        raise mapped from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: waiting for another job computing %s (%s)", stage, stage, key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield Entry(root, stage, key)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _damage(path: Path, manifest: dict | None, key: str) -> str | None:
    """Why an entry cannot be used, or None: each file the manifest names must be there with
    its recorded sha256, and stage.json must be the record of this key."""
    files = (manifest or {}).get("files")
    if not isinstance(files, dict) or "stage.json" not in files or manifest.get("key") != key:
        return f"{MANIFEST} is missing or not valid"
    for name, recorded in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if artifacts.sha256_file(path / name) != recorded:
            return f"{name} does not match its sha256"
    return None


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = artifacts.read_json(path / MANIFEST)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _versions() -> dict:
    return {"effrun": effrun.__version__, "torch": torch.__version__}


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` at `dst` (replacing it), or copy it where links are not possible
    (another file system, a file system without hard links)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _append_user(entry: Path, run_dir: Path) -> None:
    # One short line per write in append mode: concurrent appends do not interleave.
    line = json.dumps({"time": artifacts.now_iso(), "run_dir": str(Path(run_dir).resolve())})
    with open(entry / USERS, "a") as users:
        users.write(line + "\n")


def read_entries(root: Path) -> list[dict]:
    """The manifests of the entries in `root` (unreadable ones as {"damaged": True}), each
    with `path`, `bytes` (on disk) and `users` (the runs that used it) added."""
    out = []
    for path in sorted(p for p in Path(root).glob("*-*") if p.is_dir()
                       and not p.name.startswith(".")):
        manifest = _read_manifest(path) or {"damaged": True, "stage": path.name.split("-")[0]}
        users = []
        if (path / USERS).is_file():
            users = [json.loads(line) for line in (path / USERS).read_text().splitlines()
                     if line.strip()]
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        out.append({**manifest, "path": path, "bytes": size, "users": users})
    return out


def remove(path: Path) -> bool:
    """Remove an entry unless a job holds its lock (it is being read or computed); True when
    removed. Its lock file goes with it."""
    lock = Path(path).with_suffix(".lock")
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        shutil.rmtree(path, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return True
