"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

Same block table, channel rounding and `width_mult` rule as torchvision's ImageNet model, with
the usual CIFAR-port change: the stem conv and the first stride-2 stage (24 channels) use stride 1,
so a 32x32 input is downsampled 32 -> 16 -> 8 -> 4 instead of ending at 1x1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (expand ratio t, output channels c, repeats n, first stride s); the 24-channel stage has s=1
# here (2 on ImageNet), which together with the stride-1 stem keeps the final map at 4x4.
CIFAR_BLOCK_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never more than 10% below `value` (as torchvision)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += conv_bn_relu6(in_channels, hidden, 1)
        layers += conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)
        # Fixed at construction, so forward has no data-dependent branching (export-safe).
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2CifarNet(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * width_mult)
        # As in torchvision, the last conv only grows with width_mult, never shrinks.
        last_channels = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        features: list[nn.Module] = [nn.Sequential(*conv_bn_relu6(in_channels, channels, 3))]
        for expand, out, repeats, stride in CIFAR_BLOCK_SETTINGS:
            out_channels = make_divisible(out * width_mult)
            for index in range(repeats):
                block_stride = stride if index == 0 else 1
                features.append(InvertedResidual(channels, out_channels, block_stride, expand))
                channels = out_channels
        features.append(nn.Sequential(*conv_bn_relu6(channels, last_channels, 1)))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(last_channels, num_classes)
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's MobileNetV2 initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@dataclass
class MobileNetV2Cifar:
    """MobileNetV2 for 32x32 inputs; `width_mult` scales every layer's channels."""

    width_mult: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.width_mult <= 0:
            raise ValueError(f"model.width_mult must be > 0, got {self.width_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def build(self, num_classes: int, in_channels: int = 3) -> nn.Module:
        return MobileNetV2CifarNet(num_classes, in_channels, self.width_mult, self.dropout)
