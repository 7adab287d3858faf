"""Test-set evaluation, with optional test-time augmentation (averaged logits over views)."""

from __future__ import annotations

import torch
from torch import nn

from effrun.data import BatchLoader, DataSplits
from effrun.hardware import Hardware


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The input views whose logits are averaged. Every view keeps the sample's label."""
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    raise ValueError(f"unknown tta mode {mode!r}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: DataSplits, hw: Hardware,
             *, batch_size: int = 500, tta: str = "none") -> dict[str, float]:
    """Top-1 accuracy (0..1) and mean cross-entropy of `model` on uint8 images `x`."""
    was_training = model.training
    model.eval()
    loader = BatchLoader(x, y, batch_size, mean=data.mean, std=data.std, device=hw.torch_device,
                         channels_last=hw.channels_last)
    correct = torch.zeros((), device=hw.torch_device)
    loss_sum = torch.zeros((), device=hw.torch_device)
    for inputs, labels in loader:
        views = tta_views(inputs, tta)
        with hw.autocast():
            logits = sum(model(v).float() for v in views) / len(views)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    n = max(1, len(y))
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}
