"""ResNets for 32x32 inputs: He et al. (2016) CIFAR ResNets and the CIFAR ResNet-18 variant.

Both families share one network class: a 3x3 stride-1 stem (no max-pool, the input is already
small), stages of BasicBlocks where every stage after the first halves the resolution, global
average pooling and a linear classifier. Attribute names (conv1/bn1/layerN/fc) follow torchvision
so pruning tools and quantizers can address layers (e.g. skip `model.fc`) the usual way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection.

    Shortcuts that change shape use option B of the paper (1x1 conv + BN projection) rather than
    option A (strided identity + zero padding): a real conv layer is what structured pruners and
    quantizers can see, prune and fuse, where the parameter-free padding op would be opaque.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        # A second ReLU module (not reuse of relu1) so fusers/observers treat each use separately.
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class BasicBlockResNet(nn.Module):
    """Stem conv3x3/s1 + stages of BasicBlocks + global pool + linear head."""

    def __init__(
        self,
        stage_widths: list[int],
        blocks_per_stage: list[int],
        num_classes: int,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(stage_widths) != len(blocks_per_stage):
            raise ValueError("stage_widths and blocks_per_stage must have the same length")
        stem_width = stage_widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        channels = stem_width
        for index, (width, blocks) in enumerate(zip(stage_widths, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(blocks):
                stage.append(BasicBlock(channels, width, stride if block_index == 0 else 1))
                channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_stages = len(stage_widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation as in the paper; BN starts as identity; fc keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.num_stages):
            x = getattr(self, f"layer{index + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def blocks_per_stage_for_depth(depth: int) -> int:
    """He et al. CIFAR ResNets have 6n+2 layers: a stem, 3 stages of n two-conv blocks, the fc."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"model.depth must be 6n+2 (20, 32, 56, 110), got {depth}")
    return (depth - 2) // 6


@dataclass
class CifarResNet:
    """He et al. CIFAR ResNet (resnet20/32/56/110): 3 stages of width, 2*width, 4*width."""

    depth: int = 20
    width: int = 16

    def __post_init__(self) -> None:
        blocks_per_stage_for_depth(self.depth)
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")

    def build(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        blocks = blocks_per_stage_for_depth(self.depth)
        widths = [self.width, 2 * self.width, 4 * self.width]
        return BasicBlockResNet(widths, [blocks] * 3, num_classes, in_channels)


@dataclass
class ResNet18Cifar:
    """ResNet-18 adapted to 32x32: 3x3/s1 stem, no max-pool, 4 stages of width*(1, 2, 4, 8)."""

    width: int = 64

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")

    def build(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        widths = [self.width * factor for factor in (1, 2, 4, 8)]
        return BasicBlockResNet(widths, [2, 2, 2, 2], num_classes, in_channels)
