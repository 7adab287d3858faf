"""The training loop's checkpoints: written after every epoch, and with train.checkpoint_every=N
also every N optimizer steps inside one (with the position there: effrun/epoch_progress.py), so
a long epoch resumes at its next batch. Written only while every weight and statistic is finite,
the one before kept as <name>.prev.pt; resuming falls back to that one when the newest cannot be
loaded, or starts over, saying which in one line.

Under torchrun (effrun/distributed.py) rank 0 writes the checkpoints and every rank resumes
from the same file; only rank 0 changes the files, once every rank has read them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from effrun import distributed
from effrun.artifacts import atomic_path, torch_save
from effrun.epoch_progress import check_position, set_rng_states, where
from effrun.errors import EffrunError, TrainingDiverged

if TYPE_CHECKING:
    from effrun.train import LoopState

log = logging.getLogger("effrun.train")


def resume(loop: LoopState, fingerprint: str) -> None:
    """Load the checkpoint into `loop` when an earlier run of this stage left one.

    A checkpoint that cannot be loaded (truncated, 0 bytes, not a torch file) or holds NaN/inf
    is set aside with one warning line: training resumes from the previous one
    (`<name>.prev.pt`) when that one is good, else starts over.
    """
    ckpt = Path(loop.checkpoint)
    if not ckpt.exists():
        return
    state, why = _load_checkpoint(ckpt, loop.hw.torch_device)
    if state is None:
        prev = prev_checkpoint(ckpt)
        prev_state, prev_why = (_load_checkpoint(prev, loop.hw.torch_device) if prev.exists()
                                else (None, "absent"))
        distributed.barrier()  # every rank has read the files rank 0 changes next
        if prev_state is not None:
            _restore(loop, prev_state, fingerprint, prev)
            log.warning("%s: %s %s; resumed from the previous checkpoint %s %s", loop.desc,
                        ckpt, why, prev.name, where(loop))
            if distributed.is_main():
                os.replace(prev, ckpt)  # the good one is the current one again
            return
        log.warning("%s: %s %s and no good previous checkpoint (%s %s): training this stage "
                    "again from the start", loop.desc, ckpt, why, prev.name, prev_why)
        if distributed.is_main():
            ckpt.unlink(missing_ok=True)
            prev.unlink(missing_ok=True)
        return
    _restore(loop, state, fingerprint, ckpt)
    log.info("%s: resumed from %s %s", loop.desc, loop.checkpoint, where(loop))


def prev_checkpoint(checkpoint: Path) -> Path:
    """Where the checkpoint before `checkpoint` is kept: <name>.prev.pt beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.prev{checkpoint.suffix}")


def _load_checkpoint(path: Path, device: torch.device) -> tuple[dict | None, str]:
    """(the checkpoint's state, "") or (None, why it cannot be resumed from)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torn zip, 0 bytes, not a torch file: all mean "unusable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return None, f"cannot be loaded (truncated or damaged: {first})"
    if not isinstance(state, dict) or not {"epoch", "model"} <= state.keys():
        return None, "is not an effrun training checkpoint"
    bad = nonfinite_tensors(_checkpointed_tensors(state))
    if bad:  # written by an effrun that did not check
        return None, f"holds NaN/inf in {len(bad)} tensors (first: {bad[0]})"
    return state, ""


def _restore(loop: LoopState, state: dict, fingerprint: str, path: Path) -> None:
    if state.get("fingerprint") != fingerprint:
        raise EffrunError(f"{path} was written by a run with a different config: "
                          f"use a new hydra.run.dir or delete that file")
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    if loop.ema is not None:
        loop.ema.model.load_state_dict(state["ema"])
    if loop.lookahead is not None:
        loop.lookahead.state = state["lookahead"]
    # Checkpoints written before the scaler and CUDA RNG were saved lack those keys; such a run
    # resumes with a fresh scaler and the CUDA generators as they are.
    if loop.scaler is not None and state.get("scaler") is not None:
        loop.scaler.load_state_dict(state["scaler"])
    loop.history, loop.start_epoch = state["history"], state["epoch"]
    set_rng_states(state["rng"], state.get("cuda_rng"))
    position = state.get("position")  # a mid-epoch checkpoint: where in epoch "epoch" it is
    if position is not None:
        check_position(loop, position, path)
        # The RNG states again once the epoch's pass has started (EpochProgress.pending_rng).
        loop.position = {**position, "rng": state["rng"], "cuda_rng": state.get("cuda_rng")}


def save(loop: LoopState, epoch: int, fingerprint: str, position: dict | None = None) -> None:
    """Everything `resume` needs to continue after `epoch` exactly as an unbroken run would;
    with `position` (effrun/epoch_progress.py), from that point inside `epoch` instead.

    Written only when every parameter and float buffer (of the model, its EMA copy and the
    lookahead average) is finite; otherwise training stops and the last good checkpoint stays.
    The checkpoint it replaces is kept as <name>.prev.pt, the fallback when the newest one
    turns out unreadable. Every rank checks (their weights are the same); rank 0 writes.
    """
    on_cuda = loop.hw.torch_device.type == "cuda"
    state = {"fingerprint": fingerprint, "epoch": epoch + (position is None),
             "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
             "scheduler": loop.scheduler.state_dict(),
             "ema": loop.ema.model.state_dict() if loop.ema is not None else {},
             "lookahead": loop.lookahead.state if loop.lookahead is not None else {},
             "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
             "history": loop.history, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if on_cuda else None,
             "position": position}
    tensors = _checkpointed_tensors(state)
    bad = nonfinite_tensors(tensors)
    ckpt = Path(loop.checkpoint)
    if bad:
        at = (f"after epoch {epoch + 1}" if position is None
              else f"at epoch {epoch + 1} step {position['batch']}")
        total = sum(isinstance(v, torch.Tensor) and v.is_floating_point()
                    for v in tensors.values())
        kept = (f"last good checkpoint kept at {ckpt}" if ckpt.exists()
                else "no checkpoint written")
        raise TrainingDiverged(f"{loop.desc}: NaN/inf in {len(bad)} of {total} weight and "
                               f"statistics tensors {at} (first: {bad[0]}) "
                               f"although the loss stayed finite; lower optimizer.lr or use "
                               f"hardware.precision=fp32 ({kept})")
    if not distributed.is_main():
        return
    prev = prev_checkpoint(ckpt)
    if ckpt.exists():
        _keep_as(ckpt, prev)
    else:  # a fresh start: a .prev.pt left from an earlier attempt belongs to no epoch of ours
        prev.unlink(missing_ok=True)
    torch_save(state, ckpt)


def _keep_as(src: Path, dst: Path) -> None:
    """Atomically make `dst` a copy of `src`, leaving `src` in place (a hard link when the
    file system allows, else a byte copy), so a good checkpoint exists at every moment."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _checkpointed_tensors(state: dict) -> dict[str, torch.Tensor]:
    """The float weights and statistics in a checkpoint, named as in the model ("bn1.
    running_var"; "ema." / "lookahead." in front for those copies), and a mid-epoch position's
    running sums ("position.sums")."""
    named = dict(state.get("model") or {})
    for prefix in ("ema", "lookahead"):
        named.update({f"{prefix}.{k}": v for k, v in (state.get(prefix) or {}).items()})
    if state.get("position") is not None:
        named["position.sums"] = state["position"]["sums"]
    return named


# Quantization observers (QAT) start at min_val=+inf, max_val=-inf: "nothing seen yet".
OBSERVER_SENTINELS = {"min_val": float("inf"), "max_val": float("-inf")}


def nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf, in order (one device sync);
    an observer's empty-range sentinel (OBSERVER_SENTINELS) does not count."""
    floats = [(k, v) for k, v in named.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats:
        return []
    device = floats[0][1].device

    def ok(name: str, v: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(v.detach())
        sentinel = OBSERVER_SENTINELS.get(name.rsplit(".", 1)[-1])
        if sentinel is not None:
            finite |= v.detach() == sentinel
        return finite.all().to(device)

    flags = torch.stack([ok(k, v) for k, v in floats]).cpu().tolist()
    return [k for (k, _), good in zip(floats, flags, strict=True) if not good]
