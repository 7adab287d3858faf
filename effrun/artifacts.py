"""What a run leaves on disk: model artifacts, metrics.json, stage.json, summary.json.

Writes are atomic (temp file + rename) so an interrupted run never leaves a torn file behind.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effrun.errors import EffrunError

MODEL_FILE = "model.pt"


# OSErrors while writing that the user fixes (free space, permissions, a wrong path): one line.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                 errno.EROFS: "read-only file system",
                 errno.ENOTDIR: "a parent of it is a file, not a folder",
                 errno.EEXIST: "a parent of it is a file, not a folder"}


def write_error(err: OSError, path: Path) -> EffrunError | None:
    """The one-line EffrunError for an OSError met while writing `path`, or None when the
    error is not one the user can fix (then it propagates as it is)."""
    why = _WRITE_ERRNOS.get(err.errno)
    if why is None:
        return None
    culprit = err.errno in (errno.ENOTDIR, errno.EEXIST) and err.filename
    where = f" ({err.filename})" if culprit and str(err.filename) != str(path) else ""
    return EffrunError(f"{why} while writing {path}{where}")


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """Yield a temp path beside `path`; rename it into place only if the block succeeds. The
    one atomic writer: artifacts, records, checkpoints and the decoded-data cache use it.

    The file gets the permissions a plain open() would (mkstemp's are 0600), so run dirs and a
    shared cache stay readable as the umask allows. `suffix` is for writers that insist on
    a file name ending (AOTInductor wants .pt2). A full disk, a read-only or unwritable folder
    and a parent path that is a file are an EffrunError naming `path` (write_error).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        mapped = write_error(err, path)
        if mapped is None:
            raise
        raise mapped from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # Through a file object: torch.save names the archive's root folder after a path's
        # file name (here a random temp name), so equal contents would hash differently.
        try:
            torch.save(obj, handle)
        except RuntimeError:
            # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc]
            # unexpected pos ...": say what it is when the file system is (nearly) full.
            if _free_bytes(tmp) < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
            raise


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks (artifacts can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import hydra
    import omegaconf
    import torchvision

    import effrun

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "hydra": hydra.__version__,
           "omegaconf": omegaconf.__version__, "effrun": effrun.__version__,
           "platform": platform.platform()}
    for dist in ("torchao", "torch-pruning"):
        try:  # metadata only: importing torchao just to read its version costs seconds
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # optional libraries
            pass
    return out


def git_sha() -> str | None:
    """The commit of the effrun checkout in use, when it is one."""
    try:
        src = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=src, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save_model(model: nn.Module, path: Path, *, model_config: dict, num_classes: int,
               stage: str, deploy: dict | None = None, extra: dict | None = None) -> Path:
    """A self-describing checkpoint: weights + what rebuilds the network + where it came from +
    how it runs (`deploy`, see effrun.stage.Deployment) + the stage's `extra` entries.

    Only tensors and plain containers go in, so it loads with torch.load(weights_only=True).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"format": "effrun.model/1", "stage": stage, "model_config": dict(model_config),
                "num_classes": int(num_classes), "deploy": deploy or {}, "state_dict": state,
                "extra": extra or {}}, path)
    return Path(path)


def read_model_file(path: Path) -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EffrunError(f"model artifact not found: {path}") from None
    except Exception as e:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise EffrunError(f"cannot load model artifact {path}: the file is empty (0 bytes)"
                              ) from None
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise EffrunError(f"cannot load model artifact {path}: not a file torch.save wrote "
                          f"({why})") from None
    if not isinstance(blob, dict) or blob.get("format") != "effrun.model/1":
        raise EffrunError(f"{path} is not an effrun model artifact (no 'format: effrun.model/1')")
    return blob


# Loaders for artifact formats other than effrun's own .pt, keyed by file suffix:
# path -> (model, metadata). A compression method that saves something else (e.g. a torch.export
# program) registers here; LOADER_MODULES names the package that registers a suffix, imported on
# first use so that reading a .pt never pays for it.
ARTIFACT_LOADERS: dict[str, Any] = {}
LOADER_MODULES = {".pt2": "effrun.compression.quantize", ".onnx": "effrun.compression.quantize",
                  ".xml": "effrun.compression.quantize"}


def _loader(path: Path):
    """The registered loader of a non-.pt artifact, called as `loader(path, trusted=...)`."""
    if path.suffix not in ARTIFACT_LOADERS and path.suffix in LOADER_MODULES:
        importlib.import_module(LOADER_MODULES[path.suffix])
    return ARTIFACT_LOADERS.get(path.suffix)


def read_meta(path: Path, *, trusted: bool = False) -> dict:
    """An artifact's metadata (stage, model_config, num_classes, ...), whatever its format.
    `trusted` as in load_model."""
    path = Path(path)
    loader = _loader(path)
    return loader(path, trusted=trusted)[1] if loader is not None else read_model_file(path)


def load_model(path: Path, *, trusted: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model from an artifact; returns (model in eval mode, artifact metadata).

    `trusted`: True for an artifact effrun wrote in this run dir, or one the user trusts
    (`trust_artifact=true`). Otherwise a format that can hold code (a .pt2 archive: pickles,
    an AOTInductor shared library) is scanned before loading and refused in one line if it
    would run any (effrun.untrusted). effrun's .pt loads with torch.load(weights_only=True),
    which runs nothing, either way."""
    from effrun.models import build_model, load_state_into

    path = Path(path)
    loader = _loader(path)
    if loader is not None:
        return loader(path, trusted=trusted)
    blob = read_model_file(path)
    model = build_model(blob["model_config"], num_classes=blob["num_classes"])
    load_state_into(model, blob["state_dict"])
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.eval(), meta
