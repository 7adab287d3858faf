"""mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a normalized batch, with soft labels.

As both papers' reference code does, one lambda ~ Beta(alpha, alpha) is drawn per batch and
every sample is mixed with a partner from a random permutation of the same batch. CutMix pastes
the partner's box (side sqrt(1 - lambda) of the image's, at a uniform centre, clipped to the
image) and sets lambda to the share of the image left unpasted, so the labels match the pixels.
With probability 1 - prob a batch passes unmixed (its labels one-hot).

The labels come back as float (N, num_classes) rows summing to 1; torch's cross entropy takes
such probability targets (label smoothing included), and a loss that only reads labels as
targets of a cross entropy (the distillation losses) works unchanged.

lambda and the box are drawn on the host from a numpy generator the loader seeds from
(seed, epoch, batch, rank), so a GPU loader needs no device sync per batch; the permutation
comes from the loader's device generator.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MIXES = ("none", "mixup", "cutmix")


def mix_batch(x: torch.Tensor, labels: torch.Tensor, *, mix: str, alpha: float, prob: float,
              num_classes: int, generator: torch.Generator, host_rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed float NCHW batch, soft labels (N, num_classes)); `labels` are class indices."""
    soft = F.one_hot(labels, num_classes).float()
    if host_rng.random() >= prob:
        return x, soft
    lam = float(host_rng.beta(alpha, alpha))
    partner = torch.randperm(x.shape[0], generator=generator, device=x.device)
    if mix == "mixup":
        x = torch.lerp(x[partner], x, lam)  # lam * x + (1 - lam) * x[partner]
    elif mix == "cutmix":
        x, lam = _cutmix(x, partner, lam, host_rng)
    else:
        raise ValueError(f"unknown mix {mix!r}; expected one of {MIXES}")
    return x, torch.lerp(soft[partner], soft, lam)


def _cutmix(x: torch.Tensor, partner: torch.Tensor, lam: float, host_rng: np.random.Generator
            ) -> tuple[torch.Tensor, float]:
    height, width = x.shape[-2:]
    side = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * side), int(width * side)
    cy, cx = int(host_rng.integers(height)), int(host_rng.integers(width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    x = x.clone()
    x[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    return x, 1.0 - (bottom - top) * (right - left) / (height * width)


def dominant_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices: soft (N, C) labels give each sample's largest share (train accuracy
    under a mix counts a prediction right when it names the label that dominates)."""
    return labels.argmax(1) if labels.dim() == 2 else labels
