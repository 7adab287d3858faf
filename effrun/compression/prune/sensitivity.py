"""Per-layer pruning sensitivity: prune one layer alone at several levels and score the model.

Writes sensitivity.csv and prints a rich table (accuracy drop in points per layer and level).
`follow_ratios` turns the curves into per-layer ratios: one accuracy-drop budget for all layers,
each layer pruned as far as that budget allows, the budget bisected until the whole model meets
its target (sparsity, channel share or MACs). Robust layers end up pruned more.
"""

from __future__ import annotations

import copy
import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch import nn

from effrun.compression.prune.common import sample_split
from effrun.errors import EffrunError
from effrun.evaluate import evaluate

log = logging.getLogger("effrun")

# prune_one(model_copy, unit_name, level) prunes one unit of the copy in place (or returns a
# new model); the analysis evaluates what it returns.
PruneOne = Callable[[nn.Module, str, float], nn.Module | None]


@dataclass
class SensitivityOptions:
    """The sensitivity keys of the prune methods that offer the analysis (a base of their config
    dataclass; a method may override the default levels)."""

    sensitivity: bool = False  # prune each layer/group alone first; writes sensitivity.csv
    sensitivity_levels: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    sensitivity_samples: int = 1000  # images scored (val split if any, else a train sample)
    sensitivity_follow: bool = False  # per-layer/group amounts follow the sensitivity curves

    def __post_init__(self) -> None:
        key = "compression.prune"
        if not self.sensitivity_levels or not all(0 < v < 1 for v in self.sensitivity_levels):
            raise ValueError(f"{key}.sensitivity_levels must be values in (0, 1)")
        if self.sensitivity_follow and not self.sensitivity:
            raise ValueError(f"{key}.sensitivity_follow needs {key}.sensitivity=true")


def analyze(model: nn.Module, inputs, units: list[str], levels: list[float],
            prune_one: PruneOne, samples: int) -> tuple[list[dict], dict]:
    """Accuracy of the model with each unit pruned alone at each level; writes the report.
    Returns the rows and the figures for metrics.json."""
    x, y, split = sample_split(inputs, samples)
    hw, bs = inputs.hw, inputs.train.eval_batch_size
    base = evaluate(hw.prepare(copy.deepcopy(model)), x, y, inputs.data, hw,
                    batch_size=bs)["accuracy"]
    rows = []
    for unit in units:
        for level in levels:
            trial = copy.deepcopy(model)
            trial = prune_one(trial, unit, level) or trial
            acc = evaluate(hw.prepare(trial), x, y, inputs.data, hw, batch_size=bs)["accuracy"]
            rows.append({"layer": unit, "level": level, "accuracy": acc,
                         "drop_pt": 100 * (base - acc)})
    log.info("sensitivity: %d layers x %d levels scored on %d %s images (unpruned %.4f)",
             len(units), len(levels), len(y), split, base)
    write_report(rows, levels, Path(inputs.stage_dir), base, split)
    return rows, {"split": split, "images": len(y), "base_accuracy": base,
                  "csv": "sensitivity.csv"}


def write_report(rows: list[dict], levels: list[float], stage_dir: Path, base: float,
                 split: str) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / "sensitivity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "level", "accuracy", "drop_pt"])
        writer.writeheader()
        writer.writerows(rows)
    table = Table(title=f"pruning sensitivity: accuracy drop (pt) on {split}, "
                        f"unpruned {100 * base:.2f}%")
    table.add_column("layer")
    for level in levels:
        table.add_column(f"{100 * level:g}%", justify="right")
    by_layer: dict[str, dict[float, float]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["level"]] = r["drop_pt"]
    for layer, drops in by_layer.items():
        table.add_row(layer, *[f"{drops[level]:.2f}" for level in levels])
    Console().print(table)


def _curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per layer, (level, drop) points from (0, 0) with the drop made non-decreasing, so that
    evaluation noise cannot make pruning more look cheaper than pruning less."""
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for r in sorted(rows, key=lambda r: r["level"]):
        by_layer.setdefault(r["layer"], [(0.0, 0.0)]).append((r["level"], r["drop_pt"]))
    for points in by_layer.values():
        worst = 0.0
        for i, (level, drop) in enumerate(points):
            worst = max(worst, drop)
            points[i] = (level, worst)
    return by_layer


def ratios_for_budget(curves: dict[str, list[tuple[float, float]]], budget: float
                      ) -> dict[str, float]:
    """Each layer's largest level whose drop stays within `budget` points (interpolated)."""
    out = {}
    for layer, points in curves.items():
        ratio = points[-1][0]
        for (l0, d0), (l1, d1) in zip(points, points[1:], strict=False):
            if d1 > budget:
                ratio = l0 + (l1 - l0) * (budget - d0) / (d1 - d0) if d1 > d0 else l0
                break
        out[layer] = ratio
    return out


def follow_ratios(rows: list[dict], measure: Callable[[dict[str, float]], float],
                  target: float, key: str) -> dict[str, float]:
    """Per-layer ratios whose `measure` (the model-wide reduction, growing with the ratios)
    reaches `target`, found by bisecting a common accuracy-drop budget."""
    curves = _curves(rows)
    hi = max(points[-1][1] for points in curves.values()) + 1e-6
    if measure(ratios_for_budget(curves, hi)) < target:
        raise EffrunError(f"{key}: sensitivity_follow cannot reach the target {target:.3g} with "
                         f"sensitivity_levels up to {max(r['level'] for r in rows)}: add "
                         f"higher levels")
    lo = 0.0
    while hi - lo > 0.01:  # points of accuracy: finer than the evaluation can resolve
        mid = (lo + hi) / 2
        if measure(ratios_for_budget(curves, mid)) >= target:
            hi = mid
        else:
            lo = mid
    ratios = ratios_for_budget(curves, hi)
    log.info("sensitivity: per-layer ratios follow an accuracy-drop budget of %.2f pt", hi)
    return ratios
