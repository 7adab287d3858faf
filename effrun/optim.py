"""Optimizers and learning-rate schedules (the `optimizer` config group).

Each option is a dataclass that builds a torch optimizer from a model and a per-step schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("constant", "linear", "cosine", "onecycle")
UNITS = ("torch", "airbench")


@dataclass
class OptimizerBase:
    lr: float = 0.1
    weight_decay: float = 5e-4
    # Norm-layer weights and all biases usually train better without weight decay.
    decay_norm_and_bias: bool = False
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    # lr at the end of the run, as a fraction of `lr` (0 = anneal to zero).
    final_lr_fraction: float = 0.0
    # lr at the start of a linear/cosine/constant warmup, as a fraction of `lr` (0 = from ~0).
    warmup_from: float = 0.0
    # lr multiplier for the biases (shifts) of normalization layers (airbench trains them 64x
    # faster than the weights).
    norm_bias_lr_scale: float = 1.0
    # true: every param group's torch weight_decay is weight_decay / (its lr), so the decay a
    # step applies (lr x weight_decay in torch) is the same for all groups and does not change
    # when lr is retuned; false: torch's own coupling (decay grows with each group's lr).
    decoupled_weight_decay: bool = False

    def __post_init__(self) -> None:
        for key in ("lr", "weight_decay", "warmup_epochs", "final_lr_fraction", "warmup_from",
                    "norm_bias_lr_scale"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"optimizer.{key} must be a finite number, got "
                                 f"{getattr(self, key)}")
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optimizer.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.warmup_from <= 1:
            raise ValueError(f"optimizer.warmup_from must be in [0, 1], got {self.warmup_from}")
        if self.warmup_from and self.schedule == "onecycle":
            raise ValueError("optimizer.warmup_from applies to linear/cosine/constant schedules; "
                             "onecycle always starts at lr/25")
        if self.norm_bias_lr_scale <= 0:
            raise ValueError(f"optimizer.norm_bias_lr_scale must be > 0, got "
                             f"{self.norm_bias_lr_scale}")

    def step_scale(self, batch_size: int | None) -> float:
        """Factor from the configured lr / weight_decay to the per-step values torch applies
        (1 in torch units; see SGD.units)."""
        return 1.0

    def param_groups(self, model: nn.Module, batch_size: int | None = None) -> list[dict]:
        """Trainable params grouped by (lr scale, weight decay); the plain weights come first.
        `batch_size` converts lr and weight_decay given in other units (SGD.units)."""
        step = self.step_scale(batch_size)
        groups: dict[tuple[float, float], list] = {(1.0, self.weight_decay): []}
        for module in model.modules():
            is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                          nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_bias = name == "bias"
                scale = self.norm_bias_lr_scale if is_norm and is_bias else 1.0
                decays = self.decay_norm_and_bias or not (is_norm or is_bias)
                groups.setdefault((scale, self.weight_decay if decays else 0.0), []).append(p)
        out = []
        for (scale, decay), params in groups.items():
            if not params:
                continue
            lr = self.lr * scale * step
            decay = decay * step if self.decoupled_weight_decay else decay
            if self.decoupled_weight_decay:
                decay = decay / lr
            out.append({"params": params, "lr": lr, "weight_decay": decay})
        return out

    def build(self, model: nn.Module, batch_size: int | None = None) -> torch.optim.Optimizer:
        raise NotImplementedError  # each option below says which torch optimizer it is

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A per-step LR multiplier: warmup for `warmup_epochs`, then the named decay."""
        warmup = min(int(round(self.warmup_epochs * steps_per_epoch)), total_steps)
        factor = lr_factor_fn(self.schedule, total_steps, warmup, self.final_lr_fraction,
                              self.warmup_from)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor_fn(schedule: str, total_steps: int, warmup: int, final: float,
                 start: float = 0.0):
    def ramp(step: int) -> float:  # linear warmup from `start` to 1
        return start + (1.0 - start) * min(1.0, (step + 1) / warmup)

    def factor(step: int) -> float:
        if schedule == "constant":
            return ramp(step) if warmup else 1.0
        if step < warmup:
            if schedule == "onecycle":  # cosine rise from lr/25, as in Smith's one-cycle
                return 0.04 + 0.96 * (1 - math.cos(math.pi * step / warmup)) / 2
            return ramp(step)
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(progress, 1.0)
        if schedule == "linear":
            return 1.0 + (final - 1.0) * progress
        return final + (1.0 - final) * (1 + math.cos(math.pi * progress)) / 2

    return factor


@dataclass
class SGD(OptimizerBase):
    momentum: float = 0.9
    nesterov: bool = True
    # torch: lr and weight_decay are what torch applies per step to the batch-mean loss.
    # airbench: as airbench94 states them: per 1024 examples of a summed loss, with momentum
    # factored out; effrun converts them to per-step values for the run's batch size B by
    # B / (1024 * (1 + 1 / (1 - momentum))) (airbench's "kilostep scale"): lr 11.5 and decay
    # 0.0153 at B = 1024, momentum 0.85 become lr 1.5 and decay 0.0019957 per step.
    units: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.units not in UNITS:
            raise ValueError(f"optimizer.units must be one of {UNITS}, got {self.units!r}")
        if self.units == "airbench" and not self.decoupled_weight_decay:
            raise ValueError("optimizer.units=airbench states weight decay per example "
                             "(decoupled from lr): set optimizer.decoupled_weight_decay=true")

    def step_scale(self, batch_size: int | None) -> float:
        if self.units == "torch":
            return 1.0
        if batch_size is None:
            raise ValueError("optimizer.units=airbench needs the batch size to convert lr")
        return batch_size / (1024 * (1 + 1 / (1 - self.momentum)))

    def build(self, model: nn.Module, batch_size: int | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.param_groups(model, batch_size), lr=self.lr,
                               momentum=self.momentum,
                               nesterov=self.nesterov and self.momentum > 0,
                               weight_decay=self.weight_decay)


@dataclass
class AdamW(OptimizerBase):
    lr: float = 3e-3
    weight_decay: float = 0.05
    schedule: str = "cosine"
    warmup_epochs: float = 0.3  # Adam's step sizes adapt: a short warm-up suffices
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def build(self, model: nn.Module, batch_size: int | None = None) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, batch_size), lr=self.lr,
                                 betas=(self.beta1, self.beta2), eps=self.eps,
                                 weight_decay=self.weight_decay)
