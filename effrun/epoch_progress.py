"""Where training stands inside an epoch: the running figures `fit` sums, and the position a
mid-epoch checkpoint records (train.checkpoint_every), so that a long epoch resumes at the next
batch and ends with the weights and history record of an unbroken one.

A mid-epoch checkpoint is an epoch checkpoint (effrun/checkpoint.py: weights, optimizer,
schedule, EMA, lookahead, scaler, history, RNG) whose "epoch" counts the finished epochs, plus
a "position":
  epoch, batch   the epoch under way (0-based) and the batches done in it;
  loader         the loader's state_dict(): the same position. Both loaders (BatchLoader,
                 StreamLoader) draw order and augmentation from (seed, epoch, batch, rank), so
                 the position alone lets every rank continue its own shard identically: no
                 generator state to store, nor one per rank to gather;
  steps, world_size  the epoch's length and the ranks it was written by: another batch size or
                 world size would split the epoch differently, so such a position is refused;
  sums           one row per rank: [loss sum, correct, seen, seconds, cpu seconds] of the epoch
                 so far. These do differ per rank (each sums its shard until the epoch-end
                 all-reduce), so they are gathered into rank 0's file; each rank takes its row
                 back and the epoch's figures come out as in an unbroken epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from effrun import distributed
from effrun.data.mix import dominant_labels
from effrun.errors import EffrunError

if TYPE_CHECKING:
    from effrun.train import LoopState

SUMS = ("loss_sum", "correct", "seen", "seconds", "cpu_seconds")


@dataclass
class EpochProgress:
    """One epoch's running figures; `seconds`/`cpu_seconds` count the time before a resume."""

    epoch: int
    loss_sum: torch.Tensor  # summed on the device: reading it every step would force a sync
    correct: torch.Tensor
    batch: int = 0  # batches done in this epoch
    seen: int = 0
    seconds_before: float = 0.0
    cpu_seconds_before: float = 0.0
    # A resumed epoch's RNG states, set once its pass has drawn its first batch: a DataLoader
    # (StreamLoader) draws a worker seed from the global generator when its pass starts, which
    # the unbroken run did before the checkpoint, not after it.
    pending_rng: tuple | None = None
    t0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def batch_drawn(self) -> None:
        """Call with each batch before its step: the first one of a resumed epoch sets the RNG
        states the checkpoint saved."""
        if self.pending_rng is not None:
            set_rng_states(*self.pending_rng)
            self.pending_rng = None

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one finished step."""
        self.loss_sum += loss.detach() * len(labels)
        # Under mixup/CutMix labels are soft: a prediction counts against the dominant label.
        self.correct += (logits.detach().argmax(1) == dominant_labels(labels)).sum()
        self.seen += len(labels)
        self.batch += 1

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def cpu_seconds(self) -> float:
        # CPU seconds of this process (all threads): on a shared machine, the steadier figure.
        return self.cpu_seconds_before + time.process_time() - self.cpu0

    def record(self, loop: LoopState) -> dict:
        """The epoch's history record (no eval yet), over every rank's shard (one collective)."""
        seen = torch.tensor(float(self.seen), device=self.loss_sum.device)
        loss_sum, correct, seen = distributed.all_reduce_sum(self.loss_sum, self.correct, seen)
        seen, seconds = int(seen.item()), self.seconds()
        return {"epoch": self.epoch + 1, "train_loss": loss_sum.item() / max(1, seen),
                "train_accuracy": correct.item() / max(1, seen),
                "lr": loop.optimizer.param_groups[0]["lr"], "seconds": seconds,
                "cpu_seconds": self.cpu_seconds(), "images_per_s": seen / seconds}


def begin_epoch(loop: LoopState, epoch: int) -> EpochProgress:
    """Point the loader at `epoch`'s first batch, or at the batch after a mid-epoch checkpoint
    that `resume` found for this epoch; the epoch's figures so far."""
    device = loop.hw.torch_device
    position, loop.position = loop.position, None
    if position is None or position["epoch"] != epoch:
        loop.loader.set_epoch(epoch)
        return EpochProgress(epoch, torch.zeros((), device=device),
                             torch.zeros((), device=device))
    loop.loader.load_state_dict(position["loader"])
    loss_sum, correct, seen, seconds, cpu_seconds = position["sums"][
        distributed.rank_and_world()[0]].tolist()
    return EpochProgress(epoch, torch.tensor(loss_sum, device=device),
                         torch.tensor(correct, device=device), batch=position["batch"],
                         seen=int(seen), seconds_before=seconds, cpu_seconds_before=cpu_seconds,
                         pending_rng=(position["rng"], position.get("cuda_rng")))


def checkpoint_due(loop: LoopState, step: int, progress: EpochProgress) -> bool:
    """Whether a mid-epoch checkpoint follows optimizer step `step` (1-based, over the run);
    the epoch's last step gets the epoch checkpoint instead."""
    every = loop.train.checkpoint_every
    return bool(every) and step % every == 0 and progress.batch < loop.steps_per_epoch


def position_record(loop: LoopState, progress: EpochProgress) -> dict:
    """The position record of a mid-epoch checkpoint (module docstring). Every rank calls it
    at the same step: the rows of `sums` are gathered with one collective."""
    rank, world = distributed.rank_and_world()
    mine = [progress.loss_sum.double(), progress.correct.double()] + [
        torch.tensor(v, dtype=torch.float64, device=progress.loss_sum.device)
        for v in (float(progress.seen), progress.seconds(), progress.cpu_seconds())]
    rows = torch.zeros(world, len(SUMS), dtype=torch.float64, device=progress.loss_sum.device)
    rows[rank] = torch.stack(mine)
    (rows,) = distributed.all_reduce_sum(rows)  # zeros elsewhere: a gather, exactly
    return {"epoch": progress.epoch, "batch": progress.batch, "steps": loop.steps_per_epoch,
            "world_size": world, "loader": loop.loader.state_dict(), "sums": rows.cpu()}


def check_position(loop: LoopState, position: dict, path) -> None:
    """Refuse a position this run cannot continue (another world size or epoch length)."""
    world = distributed.rank_and_world()[1]
    if (position["world_size"], position["steps"]) != (world, loop.steps_per_epoch):
        raise EffrunError(f"{path} stopped inside epoch {position['epoch'] + 1} of a run with "
                          f"{position['world_size']} ranks and {position['steps']} steps per "
                          f"epoch; this run has {world} and {loop.steps_per_epoch}: rerun it "
                          f"as before, or delete that file to train this stage from the start")


def where(loop: LoopState) -> str:
    """Where a resumed run continues, for the log line: "after epoch 3/10", or inside one,
    "at epoch 4/10, step 120/390"."""
    if loop.position is None:
        return f"after epoch {loop.start_epoch}/{loop.epochs}"
    return (f"at epoch {loop.position['epoch'] + 1}/{loop.epochs}, "
            f"step {loop.position['batch']}/{loop.steps_per_epoch}")


def set_rng_states(rng: torch.Tensor, cuda_rng: list[torch.Tensor] | None) -> None:
    """Set torch's CPU generator (and the CUDA ones, where saved and present) as checkpointed."""
    torch.set_rng_state(rng.cpu())  # map_location moved it; the setter wants CPU
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_rng[:torch.cuda.device_count()]])
