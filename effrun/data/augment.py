"""Batched, on-device image augmentation: random crop, horizontal flip, cutout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Augmentation:
    """Random augmentations applied to a whole normalized NCHW float batch at once.

    crop_padding: random crop back to the input size after REFLECT-padding each side by this
        many pixels (reflect, not zero, so no artificial black borders); 0 = off.
    flip: random horizontal flip with p=0.5.
    cutout: side in pixels of a square set to 0 (= the dataset mean after normalization) at a
        random centre per sample; squares near the border are clipped; 0 = off.

    Steps run in the order crop -> flip -> cutout. Each step is a method taking
    (batch, generator), so a new option is one field plus one method in `__call__`.
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(
                f"augmentation.crop_padding must be >= 0, got {self.crop_padding}"
            )
        if self.cutout < 0:
            raise ValueError(f"augmentation.cutout must be >= 0, got {self.cutout}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_padding > 0:
            x = self._random_crop(x, generator)
        if self.flip:
            x = self._random_flip(x, generator)
        if self.cutout > 0:
            x = self._cutout(x, generator)
        return x

    def _random_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, channels, height, width = x.shape
        pad = self.crop_padding
        if pad >= height or pad >= width:
            raise ValueError(
                f"augmentation.crop_padding={pad} must be smaller than the image ({height}x{width})"
            )
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        # One window offset per sample; gather all windows with a single advanced index.
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        rows = dy[:, None] + torch.arange(height, device=x.device)
        cols = dx[:, None] + torch.arange(width, device=x.device)
        batch_idx = torch.arange(n, device=x.device)[:, None, None, None]
        channel_idx = torch.arange(channels, device=x.device)[None, :, None, None]
        return padded[batch_idx, channel_idx, rows[:, None, :, None], cols[:, None, None, :]]

    def _random_flip(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def _cutout(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = x.shape
        size = self.cutout
        cy = torch.randint(0, height, (n, 1), generator=generator, device=x.device)
        cx = torch.randint(0, width, (n, 1), generator=generator, device=x.device)
        top, left = cy - size // 2, cx - size // 2
        ys = torch.arange(height, device=x.device)[None, :]
        xs = torch.arange(width, device=x.device)[None, :]
        in_rows = (ys >= top) & (ys < top + size)
        in_cols = (xs >= left) & (xs < left + size)
        mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x.masked_fill(mask, 0.0)
