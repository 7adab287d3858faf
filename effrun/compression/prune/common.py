"""What the prune methods share: layer selection, masks, fine-tuning, measured sparsity."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable

import torch
from torch import nn

from effrun.data import BatchLoader, sample_indices
from effrun.errors import EffrunError

PRUNABLE = (nn.Conv2d, nn.Linear)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d/Linear layer by its module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE)}


def match(names: list[str], patterns: list[str], key: str) -> list[str]:
    """Names matching any fnmatch pattern; a pattern that matches nothing is a config error."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise EffrunError(f"{key}: no Conv2d/Linear layer named {pattern!r} "
                             f"(layers: {shown})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def select_layers(model: nn.Module, layers: list[str] | None, exclude: list[str],
                  skip_first_last: bool, key: str = "compression.prune") -> dict[str, nn.Module]:
    """The layers a mask-based method prunes.

    `layers` (names or fnmatch patterns) picks them explicitly; by default every Conv2d/Linear,
    without the first conv (3 input channels: few weights, large accuracy cost) and the last
    linear (the classifier) when `skip_first_last`. `exclude` then removes names.
    """
    all_layers = prunable_layers(model)
    names = list(all_layers)
    if layers is not None:
        chosen = match(names, layers, f"{key}.layers")
    else:
        chosen = names
        if skip_first_last:
            first_conv = next((n for n in names if isinstance(all_layers[n], nn.Conv2d)), None)
            last_linear = next((n for n in reversed(names)
                                if isinstance(all_layers[n], nn.Linear)), None)
            chosen = [n for n in names if n not in (first_conv, last_linear)]
    dropped = set(match(names, exclude, f"{key}.exclude")) if exclude else set()
    chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        raise EffrunError(f"{key}: the layer selection is empty")
    return {n: all_layers[n] for n in chosen}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place (masks are bool, True = kept)."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def weight_sparsity(state_dict: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Share of exactly-zero weights over `names` (layer module names), overall and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for name in names:
        w = state_dict[f"{name}.weight"]
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return {"sparsity": zeros / max(1, total), "pruned_weights": total,
            "layer_sparsity": per_layer}


def finetune(model: nn.Module, inputs, *, epochs: int, lr: float, name: str = "finetune",
             after_step: Callable | None = None) -> dict | None:
    """Fine-tune with the spine's loop: the run's optimizer at `lr`, no warm-up.

    The pruned model starts from trained weights, so the run's warm-up (meant for a random init)
    is dropped and the schedule decays from `lr`. Returns the figures for metrics.json
    (epochs, lr, test_accuracy, history), or None when epochs == 0.
    """
    if epochs <= 0:
        return None
    optimizer = dataclasses.replace(inputs.optimizer, lr=lr, warmup_epochs=0.0)
    fitted = inputs.fit(model, epochs=epochs, optimizer=optimizer, after_step=after_step,
                        name=name)
    return {"epochs": epochs, "lr": lr, "test_accuracy": fitted["test_accuracy"],
            "history": fitted["history"]}


def measured_sparsity(model: nn.Module, names: list[str]) -> dict:
    """Sparsity of the weights as they will be saved (the state_dict the artifact stores):
    over `names`, per layer, and over every conv/linear weight (`sparsity_all_layers`).

    Measured on what is saved rather than on masks: it proves the masks were made permanent
    (no mask buffers, the zeros sit in `weight`) and is what a user deploys.
    """
    saved = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    figures = weight_sparsity(saved, names)
    all_layers = [k[: -len(".weight")] for k, v in saved.items()
                  if k.endswith(".weight") and v.dim() in (2, 4)]
    figures["sparsity_all_layers"] = weight_sparsity(saved, all_layers)["sparsity"]
    return figures


def train_batches(inputs, count: int, batch_size: int = 128, device=None):
    """`count` fixed (seeded, un-augmented) training batches, e.g. for Taylor importance."""
    data = inputs.data
    pick = sample_indices(len(data.train_y), count * batch_size, inputs.seed)
    loader = BatchLoader(data.train_x[pick], data.train_y[pick], batch_size, mean=data.mean,
                         std=data.std, device=device or "cpu")
    return list(loader)


def sample_split(inputs, samples: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Images to score pruning choices on: the val split when there is one, else a seeded
    sample of the training set — never the test set the run reports."""
    data = inputs.data
    if data.val_x is not None:
        return data.val_x, data.val_y, "val"
    pick = sample_indices(len(data.train_y), samples, inputs.seed + 1)
    return data.train_x[pick], data.train_y[pick], "train sample"
