"""Test-set evaluation, with optional test-time augmentation (averaged logits over views)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effrun import distributed
from effrun.data import BatchLoader, DataSplits
from effrun.hardware import Hardware


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The input views whose logits are averaged (weights: `tta_weights`). Every view keeps the
    sample's label.

    flip_translate (airbench's TTA): the image and its mirror, plus both shifted one pixel up-left
    and one pixel down-right (reflect padding), mirrored too: 6 views.
    """
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    if mode == "flip_translate":
        height, width = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :height, :width], padded[..., 2:, 2:]]
        return [x, x.flip(-1)] + [v for s in shifted for v in (s, s.flip(-1))]
    raise ValueError(f"unknown tta mode {mode!r}")


def tta_weights(mode: str) -> list[float]:
    """Weights of `tta_views(x, mode)` in the averaged logits; they sum to 1."""
    if mode == "flip_translate":  # half on the unshifted pair, half on the four shifted views
        return [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    count = len(tta_views(torch.zeros(1, 1, 3, 3), mode))
    return [1.0 / count] * count


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: DataSplits, hw: Hardware,
             *, batch_size: int = 500, tta: str = "none", pad_last: bool = False
             ) -> dict[str, float]:
    """Top-1 accuracy (0..1) and mean cross-entropy of `model` on uint8 images `x`; with
    hardware.compile the forward is compiled too (eval mode and no_grad make it its own graph).

    `pad_last` pads a short last batch to `batch_size` (its extra outputs are dropped): a model
    compiled for one static batch shape then runs without compiling again for the remainder.
    Under torchrun each rank scores every world-size-th image (`batch_size` per rank) and the
    counts are summed over the ranks.
    """
    was_training = model.training
    model.eval()
    forward = hw.maybe_compile(model)
    n = max(1, len(y))
    rank, world = distributed.rank_and_world()
    x, y = x[rank::world], y[rank::world]
    loader = BatchLoader(x, y, batch_size, mean=data.mean, std=data.std, device=hw.torch_device,
                         channels_last=hw.channels_last)
    correct = torch.zeros((), device=hw.torch_device)
    loss_sum = torch.zeros((), device=hw.torch_device)
    weights = tta_weights(tta)
    for inputs, labels in loader:
        count = len(labels)
        if pad_last and count < batch_size:
            inputs = torch.cat([inputs, inputs.new_zeros(batch_size - count, *inputs.shape[1:])])
        views = tta_views(inputs, tta)
        with hw.autocast():
            logits = sum(w * forward(v).float() for w, v in zip(weights, views, strict=True))
        logits = logits[:count]
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    correct, loss_sum = distributed.all_reduce_sum(correct, loss_sum)
    return {"accuracy": correct.item() / n, "loss": loss_sum.item() / n}
