"""What a stage (and a compression method) gets to work with: `method(model, ctx) -> model`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from effrun.data import DataSplits
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.schema import Resolved
from effrun.train import LossFn, StepHook, fit


def trainable_hardware(model: nn.Module, hw: Hardware) -> Hardware:
    """`hw`, or a contiguous-format copy when channels_last would crash training on the CPU.

    torch's CPU (oneDNN) backward of a strided 1x1 conv reading fewer than 8 channels corrupts
    the heap in channels_last (double free / segfault, torch 2.14 on AVX2). Such convs appear in
    channel-pruned or very narrow ResNets (the downsampling shortcuts); they train fine in the
    contiguous format, a little slower.
    """
    risky = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8]
    if not (risky and hw.channels_last and hw.torch_device.type == "cpu"):
        return hw
    logging.getLogger("effrun").warning(
        "training in contiguous memory format: %s read < 8 channels, which crashes "
        "channels_last training on the CPU", ", ".join(risky))
    return replace(hw, channels_last=False)


@dataclass
class ModelRecord:
    """A model a stage produced: where its artifact lies and how it scored."""

    stage: str
    artifact: Path
    model_config: dict
    num_classes: int
    fingerprint: str
    metrics: dict = field(default_factory=dict)


@dataclass
class StageContext:
    cfg: Resolved
    stage: str
    stage_dir: Path
    data: DataSplits
    hw: Hardware
    fingerprint: str
    parent: ModelRecord | None
    # The config that rebuilds the model this stage produces. A method that changes the
    # architecture family (e.g. a distillation student) sets it; otherwise it is the parent's.
    model_config: dict = field(default_factory=dict)
    # Figures the stage reports; written to its metrics.json. "accuracy" (test top-1) is filled
    # in by the pipeline when the method does not set it.
    metrics: dict[str, Any] = field(default_factory=dict)
    # Extra entries for the saved artifact (e.g. pruning masks info); must be plain containers.
    artifact_extra: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("effrun"))

    def fit(self, model: nn.Module, *, epochs: int | None = None, optimizer: Any = None,
            loss_fn: LossFn | None = None, after_step: StepHook | None = None,
            augment: Any = "default", name: str = "checkpoint", **train_overrides) -> dict:
        """The spine's training loop, checkpointed (and resumable) in this stage's directory.

        `optimizer` defaults to the run's optimizer config; `train_overrides` replace fields of
        the run's `train` config (e.g. batch_size). Use a distinct `name` per call in one stage.
        """
        train_cfg = replace(self.cfg.run.train, **train_overrides)
        return fit(model, self.data, hw=trainable_hardware(model, self.hw), train=train_cfg,
                   optimizer=optimizer or self.cfg.optimizer,
                   augment=self.cfg.augmentation if augment == "default" else augment,
                   checkpoint=self.stage_dir / f"{name}.pt", seed=self.cfg.run.seed,
                   fingerprint=self.fingerprint, epochs=epochs, loss_fn=loss_fn,
                   after_step=after_step, desc=f"{self.stage}:{name}" if name != "checkpoint"
                   else self.stage)

    def evaluate(self, model: nn.Module, split: str = "test", *, tta: str | None = None) -> dict:
        x, y = (self.data.test_x, self.data.test_y) if split == "test" else (
            self.data.val_x, self.data.val_y)
        if x is None:
            raise ValueError(f"no {split} split: set dataset.val_fraction > 0")
        return evaluate(self.hw.prepare(model), x, y, self.data, self.hw,
                        batch_size=self.cfg.run.train.eval_batch_size,
                        tta=self.cfg.run.train.tta if tta is None else tta)
