"""The network of the airbench94 CIFAR-10 speed record (Keller Jordan, 2024), written for effrun.

Layout, for 32x32 inputs:
  whiten   2x2 conv, 3 -> 24 channels, no padding (31x31), weights frozen: the 12 eigenvectors of
           the training-patch covariance scaled to unit variance, and their negatives (so the GELU
           after it keeps both signs); only its bias trains, and only for the first epochs
  group1-3 conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU, widths 64/256/256
  pool     3x3 max-pool of the last 3x3 map, then a bias-free linear head scaled by 1/9

BatchNorms keep their scale fixed at 1 (only the shift trains) and use a high update rate
(running = 0.6 * running + 0.4 * batch: "low momentum" in the Keras sense). The first
`in_channels` filters of every 3x3 conv start as identity (Dirac) kernels, the rest random.

Two optional hooks the training code calls when a model has them (see effrun.train.fit and the
pipeline's train stage):
  init_from_data(images)  once before training from scratch, on normalized training images
  on_epoch_start(epoch)   at the start of every training epoch (0-based)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

WHITEN_KERNEL = 2
# Added to each eigenvalue before scaling by 1/sqrt: keeps near-zero-variance directions finite.
WHITEN_EPS = 5e-4


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        return self.act2(self.bn2(self.conv2(x)))


class AirbenchNet(nn.Module):
    def __init__(self, widths: list[int], num_classes: int, in_channels: int = 3, *,
                 bn_momentum: float, bn_eps: float, head_scale: float,
                 whiten_bias_epochs: int, train_bn_scale: bool):
        super().__init__()
        patch_dim = in_channels * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(in_channels, 2 * patch_dim, WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        channels = [2 * patch_dim, *widths]
        self.group1, self.group2, self.group3 = (
            ConvGroup(channels[i], channels[i + 1], bn_momentum, bn_eps) for i in range(3))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.head_scale = head_scale
        self.whiten_bias_epochs = whiten_bias_epochs
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module is not self.whiten:
                # Identity kernels for the first in_channels filters: each group starts close
                # to passing its input through, which the short schedule relies on.
                nn.init.dirac_(module.weight.data[: module.in_channels])
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.requires_grad_(train_bn_scale)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalized training images (N, C, H, W).

        With C the uncentred covariance of all 2x2 patches and C = V diag(l) V^T, the filters are
        V^T / sqrt(l + eps) and their negatives: the first half of the outputs has ~identity
        covariance over those patches.
        """
        weight = self.whiten.weight
        patches = _patches(images.to(weight.device, torch.float32), WHITEN_KERNEL)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = eigenvectors.T / torch.sqrt(eigenvalues + WHITEN_EPS)[:, None]
        filters = filters.flip(0).reshape(-1, *weight.shape[1:])  # largest variance first
        weight.copy_(torch.cat([filters, -filters]).to(weight.dtype))

    def on_epoch_start(self, epoch: int) -> None:
        # The whitening bias trains for the first epochs only, then stays fixed.
        self.whiten.bias.requires_grad_(epoch < self.whiten_bias_epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.head(x) * self.head_scale


def _patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """Every size x size patch of every image, flattened channel-major: (N * P, C * size**2)."""
    n, c = images.shape[:2]
    cols = nn.functional.unfold(images, size)  # (N, C * size**2, P)
    return cols.transpose(1, 2).reshape(-1, c * size * size)


@dataclass
class Airbench:
    """airbench94's network. bn_momentum uses torch's convention (the weight of the new batch)."""

    widths: list[int] = field(default_factory=lambda: [64, 256, 256])
    bn_momentum: float = 0.4
    bn_eps: float = 1e-12
    head_scale: float = 1 / 9
    whiten_bias_epochs: int = 3
    train_bn_scale: bool = False

    def __post_init__(self) -> None:
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"model.widths must be 3 positive ints, got {self.widths}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"model.bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.whiten_bias_epochs < 0:
            raise ValueError(f"model.whiten_bias_epochs must be >= 0, got "
                             f"{self.whiten_bias_epochs}")

    def build(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        return AirbenchNet(list(self.widths), num_classes, in_channels,
                           bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                           head_scale=self.head_scale,
                           whiten_bias_epochs=self.whiten_bias_epochs,
                           train_bn_scale=self.train_bn_scale)
