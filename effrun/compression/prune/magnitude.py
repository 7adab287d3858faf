"""Unstructured magnitude pruning: zero the smallest weights, one-shot or on the AGP schedule.

Masks live outside the model (no torch.nn.utils.prune re-parametrisation), are re-applied after
every optimizer step of the fine-tuning, and are baked into the weights before saving, so the
artifact is a plain state_dict whose zeros are the pruning. The weights stay dense: PyTorch's
dense kernels multiply the zeros too, so this saves nothing at inference unless a sparse runtime
or compression of the file is used. The stage says so in its metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effrun.compression.prune.common import (
    apply_masks,
    finetune,
    measured_sparsity,
    select_layers,
)
from effrun.compression.prune.sensitivity import (
    SensitivityOptions,
    analyze,
    follow_ratios,
)
from effrun.stage import StageInputs, StageResult

KEY = "compression.prune"
SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "agp")


def keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask keeping all but the round(sparsity * n) smallest scores (exact count)."""
    k = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.argsort(scores.flatten())[:k]] = False
    return mask.view_as(scores)


@torch.no_grad()
def magnitude_masks(model: nn.Module, names: list[str], sparsity: float, scope: str,
                    per_layer: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Masks zeroing the smallest |w|: one threshold over all `names` (global) or per layer.
    `per_layer` gives each layer its own share, scaled by sparsity / (their weighted mean)."""
    weights = {n: model.get_submodule(n).weight.detach().abs() for n in names}
    if per_layer is not None:
        total = sum(w.numel() for w in weights.values())
        mean = sum(per_layer[n] * weights[n].numel() for n in names) / total
        scale = sparsity / mean if mean > 0 else 0.0
        return {n: keep_largest(w, min(1.0, per_layer[n] * scale)) for n, w in weights.items()}
    if scope == "layer":
        return {n: keep_largest(w, sparsity) for n, w in weights.items()}
    flat = keep_largest(torch.cat([w.flatten() for w in weights.values()]), sparsity)
    masks, start = {}, 0
    for n, w in weights.items():
        masks[n] = flat[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def agp_sparsity(final: float, step: int, end_step: int) -> float:
    """Zhu & Gupta (2017) cubic schedule from 0 at step 0 to `final` at `end_step`."""
    if step >= end_step:
        return final
    return final * (1.0 - (1.0 - step / end_step) ** 3)


@dataclass
class MagnitudePrune(SensitivityOptions):
    sparsity: float = 0.5  # share of the selected layers' weights set to zero
    scope: str = "global"  # global: one threshold over all selected layers | layer: per layer
    schedule: str = "oneshot"  # oneshot: prune, then fine-tune | agp: prune gradually while tuning
    finetune_epochs: int = 2
    lr: float = 0.01  # fine-tuning learning rate (the run's optimizer, no warm-up)
    agp_end: float = 0.75  # agp: share of the fine-tuning steps at which `sparsity` is reached
    update_every: int = 10  # agp: optimizer steps between mask updates
    layers: list[str] | None = None  # names/patterns to prune; null = all Conv2d/Linear
    exclude: list[str] = field(default_factory=list)
    skip_first_last: bool = True  # keep the first conv and the classifier dense
    # sensitivity, sensitivity_levels, sensitivity_samples, sensitivity_follow: SensitivityOptions

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"{KEY}.sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in SCOPES:
            raise ValueError(f"{KEY}.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{KEY}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "agp" and self.finetune_epochs < 1:
            raise ValueError(f"{KEY}.schedule=agp prunes during fine-tuning: "
                             f"set {KEY}.finetune_epochs >= 1")
        if self.finetune_epochs < 0 or self.lr <= 0:
            raise ValueError(f"{KEY}.finetune_epochs must be >= 0 and {KEY}.lr > 0")
        if not 0.0 < self.agp_end <= 1.0 or self.update_every < 1:
            raise ValueError(f"{KEY}.agp_end must be in (0, 1] and {KEY}.update_every >= 1")
        super().__post_init__()

    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult:
        layers = select_layers(model, self.layers, self.exclude, self.skip_first_last, KEY)
        names = list(layers)
        metrics: dict = {"method": "magnitude", "target_sparsity": self.sparsity,
                         "schedule": self.schedule}
        per_layer = None
        if self.sensitivity:
            per_layer, metrics["sensitivity"] = self._sensitivity(model, inputs, layers)
        metrics["scope"] = "per-layer (sensitivity)" if per_layer else self.scope
        if per_layer:
            metrics["layer_target_sparsity"] = per_layer

        def masks_at(sparsity: float) -> dict[str, torch.Tensor]:
            return magnitude_masks(model, names, sparsity, self.scope, per_layer)

        state: dict = {"masks": None}
        if self.schedule == "oneshot":
            state["masks"] = masks_at(self.sparsity)
            apply_masks(model, state["masks"])
            metrics["accuracy_before_finetune"] = inputs.evaluate(model)["accuracy"]

        def after_step(m: nn.Module, step: int, total: int) -> None:
            if self.schedule == "agp":
                end = max(1, round(self.agp_end * total))
                # The sparsity of the last scheduled update, so a resumed run recomputes the
                # same masks as an uninterrupted one (pruned weights are zero, hence smallest).
                last = min(end, step - step % self.update_every) if step < end else end
                if state["masks"] is None or last == step:
                    state["masks"] = masks_at(agp_sparsity(self.sparsity, last, end))
            apply_masks(m, state["masks"])

        tuned = finetune(model, inputs, epochs=self.finetune_epochs, lr=self.lr,
                         after_step=after_step)
        if tuned:
            metrics["finetune"] = {"finetune": tuned}
        # Bake the final masks in (EMA or weight averaging may have refilled zeros). For agp
        # they are recomputed at the final sparsity: when fine-tuning resumed past its last step
        # no hook ran, and the zeros in the weights give the same masks back.
        apply_masks(model, state["masks"] if self.schedule == "oneshot"
                    else masks_at(self.sparsity))
        metrics.update(measured_sparsity(model, names))
        note = (f"unstructured sparsity {100 * metrics['sparsity']:.1f}% of the pruned layers "
                f"(measured from the saved weights); the tensors stay dense and dense kernels "
                f"multiply the zeros, so latency does not improve")
        return StageResult(model=model, accuracy=inputs.evaluate(model)["accuracy"],
                           metrics=metrics, note=note)

    def _sensitivity(self, model, inputs, layers) -> tuple[dict[str, float] | None, dict]:
        def prune_one(m: nn.Module, name: str, level: float) -> None:
            apply_masks(m, magnitude_masks(m, [name], level, "layer"))

        rows, report = analyze(model, inputs, list(layers), self.sensitivity_levels, prune_one,
                               self.sensitivity_samples)
        if not self.sensitivity_follow:
            return None, report
        sizes = {n: m.weight.numel() for n, m in layers.items()}
        total = sum(sizes.values())
        return follow_ratios(rows, lambda r: sum(r[n] * sizes[n] for n in sizes) / total,
                             self.sparsity, KEY), report
