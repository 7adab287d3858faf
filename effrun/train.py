"""The training loop every stage shares: train, pruning fine-tune, distillation, QAT.

One entry point, `fit`. It checkpoints every epoch (atomically), and with
train.checkpoint_every=N also every N optimizer steps inside one; it resumes from the last
checkpoint when the file exists (a mid-epoch one at its next batch: effrun/epoch_progress.py),
so an interrupted run picks up where it stopped and ends with the same weights as an
uninterrupted one. fp16 scales the loss with a GradScaler.
A checkpoint is written only while every weight and statistic is finite; the one before it is
kept as <name>.prev.pt, where resuming falls back to when the newest cannot be loaded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from effrun import distributed
from effrun.checkpoint import resume as resume_checkpoint
from effrun.checkpoint import save as save_checkpoint
from effrun.data import Augmentation, BatchLoader, DataSplits
from effrun.data.stream import StreamLoader, train_loader
from effrun.epoch_progress import EpochProgress, begin_epoch, checkpoint_due, position_record
from effrun.errors import TrainingDiverged
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.models.hooks import EpochStart
from effrun.optim import OptimizerBase
from effrun.schema import TrainConfig

log = logging.getLogger(__name__)

# loss_fn(logits, inputs, labels) -> scalar loss; distillation passes its own.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# after_step(model, step, total_steps) runs after each optimizer step (e.g. gradual pruning).
StepHook = Callable[[nn.Module, int, int], None]
# on_epoch(record) runs after each finished epoch with its history record (e.g. a tracker).
EpochHook = Callable[[dict], None]
NAN_CHECK_EVERY = 25  # steps; checking every step would force a device sync per step


class EMA:
    """Exponential moving average of a model's float parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state, state = self.model.state_dict(), model.state_dict()
        floats = [k for k, v in ema_state.items() if v.is_floating_point()]
        torch._foreach_lerp_([ema_state[k] for k in floats], [state[k] for k in floats],
                             1 - self.decay)
        for k, v in ema_state.items():
            if not v.is_floating_point():
                v.copy_(state[k])


class Lookahead:
    """Lookahead-style weight averaging, as airbench94 uses it.

    Every `every` optimizer steps the averaged copy moves toward the live weights,
    avg = d * avg + (1 - d) * live with d = decay * (step / total) ** 3, and the live weights are
    reset to it. d starts near 0 (the copy just follows) and grows, so late noisy steps are
    damped. On the last step the model takes the average. Float buffers (BN statistics) count too.
    """

    def __init__(self, model: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()
                      if v.is_floating_point()}

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total: int) -> None:
        if step % self.every and step < total:
            return
        d = 1.0 if step >= total else self.decay * (step / total) ** 3
        live = model.state_dict()
        averaged = list(self.state.values())
        weights = [live[k] for k in self.state]
        torch._foreach_lerp_(averaged, weights, 1.0 - d)
        torch._foreach_copy_(weights, averaged)


@dataclass
class LoopState:
    """One `fit` call's settings and the objects built from them; `resume` fills the last
    three (`position`: a mid-epoch checkpoint's, until its epoch starts)."""

    model: nn.Module
    hw: Hardware
    train: TrainConfig
    epochs: int
    desc: str
    checkpoint: Path
    loader: BatchLoader | StreamLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    after_step: StepHook | None
    ema: EMA | None
    lookahead: Lookahead | None
    scaler: torch.amp.GradScaler | None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    position: dict | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def fit(model: nn.Module, data: DataSplits, *, hw: Hardware, train: TrainConfig,
        optimizer: OptimizerBase, augment: Augmentation | None, checkpoint: Path, seed: int,
        fingerprint: str = "", epochs: int | None = None, loss_fn: LossFn | None = None,
        after_step: StepHook | None = None, desc: str = "train",
        on_epoch: EpochHook | None = None) -> dict:
    """Train `model` in place; returns {'history': [...], 'val_accuracy'?, 'test_accuracy'}.
    `on_epoch` sees each epoch's record once it is checkpointed (not the epochs a resume
    skips); it must not change it."""
    loop = _build_loop(hw.prepare(model), data, hw=hw, train=train, optimizer=optimizer,
                       augment=augment, checkpoint=checkpoint, seed=seed,
                       epochs=train.epochs if epochs is None else epochs, loss_fn=loss_fn,
                       after_step=after_step, desc=desc)
    resume_checkpoint(loop, fingerprint)
    # Under torchrun the steps run through DDP (a model a stage changed is wrapped afresh);
    # loop.model stays the plain module: what is evaluated, checkpointed and saved.
    with distributed.data_parallel(loop.model, sync_bn=hw.sync_bn) as trained:
        step_model = hw.maybe_compile(trained)
        for epoch in range(loop.start_epoch, loop.epochs):
            record = _train_epoch(loop, step_model, epoch, fingerprint)
            eval_note = _evaluate_epoch(loop, data, epoch, record)
            loop.history.append(record)
            log.info("%s epoch %d/%d  loss %.4f  train acc %.4f%s  %.0f img/s  %.1fs", desc,
                     epoch + 1, loop.epochs, record["train_loss"], record["train_accuracy"],
                     eval_note, record["images_per_s"], record["seconds"])
            save_checkpoint(loop, epoch, fingerprint)
            if on_epoch is not None:
                on_epoch(dict(record))  # a copy: the history stays the loop's own
    return _final_result(loop, data)


def _build_loop(model: nn.Module, data: DataSplits, *, hw: Hardware, train: TrainConfig,
                optimizer: OptimizerBase, augment: Augmentation | None, checkpoint: Path,
                seed: int, epochs: int, loss_fn: LossFn | None, after_step: StepHook | None,
                desc: str) -> LoopState:
    # train.batch_size is the global batch: under torchrun each rank takes its share of it.
    rank, world = distributed.rank_and_world()
    loader = train_loader(data, distributed.per_rank_batch(train.batch_size), augment=augment,
                          device=hw.torch_device, channels_last=hw.channels_last, seed=seed,
                          rank=rank, world_size=world)
    opt = optimizer.build(model, batch_size=train.batch_size)
    steps_per_epoch = len(loader)
    sched = optimizer.scheduler(opt, max(1, epochs * steps_per_epoch), steps_per_epoch)
    ema = EMA(model, train.ema_decay) if train.ema_decay else None
    lookahead = (Lookahead(model, train.lookahead_every,
                           train.lookahead_decay ** train.lookahead_every)
                 if train.lookahead_every else None)
    if loss_fn is None:
        # dataset.balance=loss_weights: per-class weights (effrun/data/subset.py); else None.
        weight = None if data.class_weights is None else data.class_weights.to(hw.torch_device)
        ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=train.label_smoothing)
        loss_fn = lambda logits, inputs, labels: ce(logits, labels)  # noqa: E731
    return LoopState(model=model, hw=hw, train=train, epochs=epochs, desc=desc,
                     checkpoint=checkpoint, loader=loader, optimizer=opt, scheduler=sched,
                     loss_fn=loss_fn, after_step=after_step, ema=ema, lookahead=lookahead,
                     scaler=_grad_scaler(hw))


def _grad_scaler(hw: Hardware) -> torch.amp.GradScaler | None:
    # fp16 has 5 exponent bits: small gradients flush to zero unless the loss is scaled up first.
    # bf16 has fp32's exponent range, so bf16 and fp32 train unscaled.
    if hw.autocast_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(hw.torch_device.type)


def _train_epoch(loop: LoopState, step_model: Callable, epoch: int, fingerprint: str) -> dict:
    """One pass over the training data (after a mid-epoch resume, the rest of it), with the
    mid-epoch checkpoints; returns the epoch's history record (no eval yet)."""
    if isinstance(loop.model, EpochStart):
        loop.model.on_epoch_start(epoch)
    loop.model.train()
    progress = begin_epoch(loop, epoch)
    bar = tqdm(loop.loader, desc=f"{loop.desc} {epoch + 1}/{loop.epochs}", leave=False,
               disable=None, dynamic_ncols=True, initial=progress.batch)
    for i, (inputs, labels) in enumerate(bar, start=progress.batch):
        progress.batch_drawn()
        step = epoch * loop.steps_per_epoch + i + 1
        loss, logits = _train_step(loop, step_model, inputs, labels, step)
        progress.add(loss, logits, labels)
        if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == loop.steps_per_epoch:
            _check_finite(progress.loss_sum, loop.desc, epoch, i, loop.checkpoint)
            _show_progress(bar, loop, progress)
        if checkpoint_due(loop, step, progress):
            _check_finite(progress.loss_sum, loop.desc, epoch, i, loop.checkpoint)
            save_checkpoint(loop, epoch, fingerprint, position_record(loop, progress))
    bar.close()
    return progress.record(loop)


def _show_progress(bar: tqdm, loop: LoopState, progress: EpochProgress) -> None:
    seen = max(1, progress.seen)
    # lr is a Python float (no sync): the schedule's current value, as timm shows it.
    bar.set_postfix(loss=f"{progress.loss_sum.item() / seen:.3f}",
                    acc=f"{progress.correct.item() / seen:.3f}",
                    lr=f"{loop.optimizer.param_groups[0]['lr']:.2e}",
                    ips=f"{seen / max(1e-9, progress.seconds()):.0f}")


def _train_step(loop: LoopState, step_model: Callable, inputs: torch.Tensor,
                labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step number `step` (1-based); returns (loss, logits)."""
    with loop.hw.autocast():
        logits = step_model(inputs)
    loss = loop.loss_fn(logits.float(), inputs, labels)
    opt, scaler = loop.optimizer, loop.scaler
    opt.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if loop.train.grad_clip_norm:
        if scaler is not None:
            scaler.unscale_(opt)  # the clip threshold is for the true gradients
        nn.utils.clip_grad_norm_(loop.model.parameters(), loop.train.grad_clip_norm)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)  # skips the update when the scaled gradients overflowed
        scaler.update()
    # The schedule follows the step count, also past an update the scaler skipped.
    loop.scheduler.step()
    if loop.lookahead is not None:
        loop.lookahead.step(loop.model, step, loop.total_steps)
    if loop.ema is not None:
        loop.ema.update(loop.model)
    if loop.after_step is not None:
        loop.after_step(loop.model, step, loop.total_steps)
    return loss, logits


def _check_finite(loss_sum: torch.Tensor, desc: str, epoch: int, step: int, ckpt: Path) -> None:
    if not torch.isfinite(loss_sum):
        kept = f"last good checkpoint kept at {ckpt}" if Path(ckpt).exists() else "no checkpoint"
        raise TrainingDiverged(f"{desc}: loss became {loss_sum.item()} at epoch {epoch + 1} "
                               f"step {step + 1}; lower optimizer.lr or use hardware.precision="
                               f"fp32 ({kept})")


def _evaluate_epoch(loop: LoopState, data: DataSplits, epoch: int, record: dict) -> str:
    """Add val (else test) metrics to `record` on eval epochs; returns a note for the log line."""
    every, last = loop.train.eval_every, epoch + 1 == loop.epochs
    if not every or ((epoch + 1) % every and not last):
        return ""
    x, y, split = ((data.val_x, data.val_y, "val") if data.val_x is not None
                   else (data.test_x, data.test_y, "test"))
    # Per-epoch evaluation skips TTA (it doubles eval time); the final figure uses it.
    metrics = evaluate(loop.ema.model if loop.ema is not None else loop.model, x, y, data,
                       loop.hw, batch_size=loop.train.eval_batch_size)
    record[f"{split}_accuracy"] = metrics["accuracy"]
    record[f"{split}_loss"] = metrics["loss"]
    return f"  {split} acc {metrics['accuracy']:.4f}"


def _final_result(loop: LoopState, data: DataSplits) -> dict:
    """The model takes the EMA weights, if any; then the final (TTA) test figures."""
    model, history, batch_size = loop.model, loop.history, loop.train.eval_batch_size
    if loop.ema is not None:
        model.load_state_dict(loop.ema.model.state_dict())
    result: dict = {"history": history, "epochs": loop.epochs}
    final = evaluate(model, data.test_x, data.test_y, data, loop.hw, batch_size=batch_size,
                     tta=loop.train.tta)
    result["test_accuracy"], result["test_loss"] = final["accuracy"], final["loss"]
    if data.val_x is not None:
        result["val_accuracy"] = history[-1].get("val_accuracy") if history else None
        if result["val_accuracy"] is None:  # eval_every=0 or nothing trained
            result["val_accuracy"] = evaluate(model, data.val_x, data.val_y, data, loop.hw,
                                              batch_size=batch_size)["accuracy"]
    if history:
        result["train_seconds"] = sum(h["seconds"] for h in history)
        result["images_per_s"] = history[-1]["images_per_s"]
    return result
