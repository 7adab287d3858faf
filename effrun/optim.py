"""Optimizers and learning-rate schedules (the `optimizer` config group).

Each option is a dataclass that builds a torch optimizer from a model and a per-step schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("constant", "linear", "cosine", "onecycle")


@dataclass
class OptimizerBase:
    lr: float = 0.1
    weight_decay: float = 5e-4
    # Norm-layer weights and all biases usually train better without weight decay.
    decay_norm_and_bias: bool = False
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    # lr at the end of the run, as a fraction of `lr` (0 = anneal to zero).
    final_lr_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optimizer.warmup_epochs must be >= 0, got {self.warmup_epochs}")

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.decay_norm_and_bias:
            return [{"params": [p for p in model.parameters() if p.requires_grad]}]
        decay, no_decay = [], []
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                              nn.LayerNorm))
                (no_decay if is_norm or name == "bias" else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError  # each option below says which torch optimizer it is

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int,
                  steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        """A per-step LR multiplier: warmup for `warmup_epochs`, then the named decay."""
        warmup = min(int(round(self.warmup_epochs * steps_per_epoch)), total_steps)
        factor = lr_factor_fn(self.schedule, total_steps, warmup, self.final_lr_fraction)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lr_factor_fn(schedule: str, total_steps: int, warmup: int, final: float):
    def factor(step: int) -> float:
        if schedule == "constant":
            return min(1.0, (step + 1) / warmup) if warmup else 1.0
        if step < warmup:
            if schedule == "onecycle":  # cosine rise from lr/25, as in Smith's one-cycle
                return 0.04 + 0.96 * (1 - math.cos(math.pi * step / warmup)) / 2
            return (step + 1) / warmup
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

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.param_groups(model), lr=self.lr, momentum=self.momentum,
                               nesterov=self.nesterov and self.momentum > 0,
                               weight_decay=self.weight_decay)


@dataclass
class AdamW(OptimizerBase):
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def build(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=self.lr,
                                 betas=(self.beta1, self.beta2), eps=self.eps,
                                 weight_decay=self.weight_decay)
