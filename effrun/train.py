"""The training loop every stage shares: train, pruning fine-tune, distillation, QAT.

One function, `fit`. It checkpoints every epoch (atomically) and resumes from the last finished
epoch when the checkpoint file exists, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from effrun.artifacts import torch_save
from effrun.data import Augmentation, BatchLoader, DataSplits
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.optim import OptimizerBase
from effrun.schema import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# loss_fn(logits, inputs, labels) -> scalar loss; distillation passes its own.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# after_step(model, step, total_steps) runs after each optimizer step (e.g. gradual pruning).
StepHook = Callable[[nn.Module, int, int], None]
NAN_CHECK_EVERY = 25  # steps; checking every step would force a device sync per step


class TrainingDiverged(RuntimeError):
    pass


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


def fit(model: nn.Module, data: DataSplits, *, hw: Hardware, train: TrainConfig,
        optimizer: OptimizerBase, augment: Augmentation | None, checkpoint: Path, seed: int,
        fingerprint: str = "", epochs: int | None = None, loss_fn: LossFn | None = None,
        after_step: StepHook | None = None, desc: str = "train") -> dict:
    """Train `model` in place; returns {'history': [...], 'val_accuracy'?, 'test_accuracy'}."""
    epochs = train.epochs if epochs is None else epochs
    device = hw.torch_device
    model = hw.prepare(model)
    n = len(data.train_y)
    loader = BatchLoader(data.train_x, data.train_y, train.batch_size, mean=data.mean,
                         std=data.std, shuffle=True, drop_last=n > train.batch_size,
                         augment=augment, device=device, channels_last=hw.channels_last,
                         seed=seed)
    opt = optimizer.build(model)
    steps_per_epoch = len(loader)
    sched = optimizer.scheduler(opt, max(1, epochs * steps_per_epoch), steps_per_epoch)
    ema = EMA(model, train.ema_decay) if train.ema_decay else None
    lookahead = (Lookahead(model, train.lookahead_every, train.lookahead_decay)
                 if train.lookahead_every else None)
    total_steps = epochs * steps_per_epoch
    on_epoch_start = getattr(model, "on_epoch_start", None)  # optional model hook
    if loss_fn is None:
        ce = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
        loss_fn = lambda logits, inputs, labels: ce(logits, labels)  # noqa: E731

    history: list[dict] = []
    start_epoch = 0
    if Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("fingerprint") != fingerprint:
            raise ConfigError(f"{checkpoint} was written by a run with a different config: "
                              f"use a new hydra.run.dir or delete that file")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        if lookahead is not None:
            lookahead.state = state["lookahead"]
        history, start_epoch = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"].cpu())
        log.info("%s: resumed from %s after epoch %d/%d", desc, checkpoint, start_epoch, epochs)

    step_model = hw.maybe_compile(model)
    eval_x, eval_y, eval_name = ((data.val_x, data.val_y, "val") if data.val_x is not None
                                 else (data.test_x, data.test_y, "test"))
    for epoch in range(start_epoch, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        model.train()
        loader.set_epoch(epoch)
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None,
                   dynamic_ncols=True)
        for i, (inputs, labels) in enumerate(bar):
            with hw.autocast():
                logits = step_model(inputs)
            loss = loss_fn(logits.float(), inputs, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip_norm)
            opt.step()
            sched.step()
            step = epoch * steps_per_epoch + i + 1
            if lookahead is not None:
                lookahead.step(model, step, total_steps)
            if ema is not None:
                ema.update(model)
            if after_step is not None:
                after_step(model, step, total_steps)
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
            if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == steps_per_epoch:
                _check_finite(loss_sum, desc, epoch, i, checkpoint)
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}",
                                acc=f"{correct.item() / seen:.3f}",
                                ips=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        # CPU seconds of this process (all threads): on a shared machine, the steadier figure.
        cpu_seconds = time.process_time() - cpu0
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / max(1, seen),
                  "train_accuracy": correct.item() / max(1, seen),
                  "lr": opt.param_groups[0]["lr"], "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "images_per_s": seen / seconds}
        eval_note = ""
        if train.eval_every and ((epoch + 1) % train.eval_every == 0 or epoch + 1 == epochs):
            # Per-epoch evaluation skips TTA (it doubles eval time); the final figure uses it.
            metrics = evaluate(ema.model if ema is not None else model, eval_x, eval_y, data,
                               hw, batch_size=train.eval_batch_size)
            record[f"{eval_name}_accuracy"] = metrics["accuracy"]
            record[f"{eval_name}_loss"] = metrics["loss"]
            eval_note = f"  {eval_name} acc {metrics['accuracy']:.4f}"
        history.append(record)
        log.info("%s epoch %d/%d  loss %.4f  train acc %.4f%s  %.0f img/s  %.1fs", desc,
                 epoch + 1, epochs, record["train_loss"], record["train_accuracy"], eval_note,
                 record["images_per_s"], seconds)
        torch_save({"fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "ema": ema.model.state_dict() if ema is not None else {},
                    "lookahead": lookahead.state if lookahead is not None else {},
                    "history": history, "rng": torch.get_rng_state()}, checkpoint)

    if ema is not None:
        model.load_state_dict(ema.model.state_dict())
    result: dict = {"history": history, "epochs": epochs}
    final = evaluate(model, data.test_x, data.test_y, data, hw,
                     batch_size=train.eval_batch_size, tta=train.tta)
    result["test_accuracy"], result["test_loss"] = final["accuracy"], final["loss"]
    if data.val_x is not None:
        result["val_accuracy"] = (history[-1].get("val_accuracy") if history else None)
        if result["val_accuracy"] is None:  # eval_every=0 or nothing trained
            result["val_accuracy"] = evaluate(model, data.val_x, data.val_y, data, hw,
                                              batch_size=train.eval_batch_size)["accuracy"]
    if history:
        result["train_seconds"] = sum(h["seconds"] for h in history)
        result["images_per_s"] = history[-1]["images_per_s"]
    return result


def _check_finite(loss_sum: torch.Tensor, desc: str, epoch: int, step: int, ckpt: Path) -> None:
    if not torch.isfinite(loss_sum):
        kept = f"last good checkpoint kept at {ckpt}" if Path(ckpt).exists() else "no checkpoint"
        raise TrainingDiverged(f"{desc}: loss became {loss_sum.item()} at epoch {epoch + 1} "
                               f"step {step + 1}; lower optimizer.lr or use hardware.precision="
                               f"fp32 ({kept})")
