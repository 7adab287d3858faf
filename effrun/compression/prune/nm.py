"""N:M semi-structured sparsity (2:4 by default): in every group of M consecutive input weights
at most N are non-zero.

Groups run along the input channels at each kernel position (the weight viewed as
[out, kh, kw, in]), the layout NVIDIA's sparse tensor cores use for convolutions. That hardware
(Ampere and newer, via torch.sparse.to_sparse_semi_structured or TensorRT) can skip the zeros;
PyTorch's CPU kernels cannot, so on the CPU this gives no speed-up at all — the stage says so.
Layers whose input width is not a multiple of M (e.g. depthwise convs) are left dense and listed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from effrun.compression.prune.common import (
    apply_masks,
    finetune,
    measured_sparsity,
    select_layers,
)
from effrun.errors import EffrunError
from effrun.stage import StageInputs, StageResult

KEY = "compression.prune"
log = logging.getLogger("effrun")


def _grouped(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight as [-1, m] groups of consecutive input weights ([out, kh, kw, in] order)."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    return w.reshape(-1, m)


def nm_compatible(layer: nn.Module, m: int) -> bool:
    return layer.weight.shape[1] % m == 0


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest |w| of every group of m (True = kept)."""
    groups = _grouped(weight.detach().abs(), m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    if weight.dim() == 4:
        out, _, kh, kw = weight.shape
        return keep.view(out, kh, kw, -1).permute(0, 3, 1, 2).contiguous()
    return keep.view_as(weight)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m holds at most n non-zeros."""
    return bool(((_grouped(weight, m) != 0).sum(1) <= n).all())


@dataclass
class NMPrune:
    n: int = 2  # non-zeros kept ...
    m: int = 4  # ... in every group of m consecutive input weights
    finetune_epochs: int = 2
    lr: float = 0.01  # fine-tuning learning rate (the run's optimizer, no warm-up)
    layers: list[str] | None = None  # names/patterns to prune; null = all Conv2d/Linear
    exclude: list[str] = field(default_factory=list)
    skip_first_last: bool = True  # keep the first conv and the classifier dense

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise ValueError(f"{KEY}.n and {KEY}.m need 1 <= n < m, got {self.n}:{self.m}")
        if self.finetune_epochs < 0 or self.lr <= 0:
            raise ValueError(f"{KEY}.finetune_epochs must be >= 0 and {KEY}.lr > 0")

    def _layers(self, model: nn.Module) -> tuple[list[str], list[str]]:
        chosen = select_layers(model, self.layers, self.exclude, self.skip_first_last, KEY)
        ok = [name for name, layer in chosen.items() if nm_compatible(layer, self.m)]
        return ok, [name for name in chosen if name not in ok]

    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult:
        names, skipped = self._layers(model)
        if not names:
            raise EffrunError(f"{KEY}: no selected layer has an input width divisible by "
                              f"m={self.m}")
        if skipped:
            log.info("prune: %d layers left dense (input width not a multiple of %d): %s",
                     len(skipped), self.m, ", ".join(skipped))
        masks = {name: nm_mask(model.get_submodule(name).weight, self.n, self.m)
                 for name in names}
        apply_masks(model, masks)
        metrics: dict = {"method": "nm", "pattern": f"{self.n}:{self.m}",
                         "dense_layers": skipped,
                         "accuracy_before_finetune": inputs.evaluate(model)["accuracy"]}
        tuned = finetune(model, inputs, epochs=self.finetune_epochs, lr=self.lr,
                         after_step=lambda m, step, total: apply_masks(m, masks))
        if tuned:
            metrics["finetune"] = {"finetune": tuned}
        apply_masks(model, masks)  # EMA or weight averaging may have refilled zeros
        metrics.update(measured_sparsity(model, names))
        state = model.state_dict()
        metrics["pattern_holds"] = all(
            follows_nm(state[f"{name}.weight"], self.n, self.m) for name in names)
        note = (f"{self.n}:{self.m} semi-structured sparsity ({100 * metrics['sparsity']:.1f}% "
                f"of the pruned layers' weights, measured from the saved weights): only sparse "
                f"tensor cores (NVIDIA Ampere+) can use it; on the CPU there is no speed-up")
        return StageResult(model=model, accuracy=inputs.evaluate(model)["accuracy"],
                           metrics=metrics, note=note)
