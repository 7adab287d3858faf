"""Batched, on-device image augmentation: random crop, horizontal flip, cutout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effrun.errors import EffrunError


@dataclass
class Augmentation:
    """Random augmentations applied to a whole normalized NCHW float batch at once.

    crop_padding: random crop back to the input size after REFLECT-padding each side by this
        many pixels (reflect, not zero, so no artificial black borders); 0 = off.
    flip: random horizontal flip with p=0.5.
    alternate_flip: with flip, flip each sample in every other epoch instead of by a coin toss
        per epoch: a fixed random half of the samples (drawn from the loader's seed) is flipped
        in even epochs, the other half in odd ones, so every epoch flips exactly the samples the
        previous one did not (airbench). Needs the sample indices and epoch from the loader.
    cutout: side in pixels of a square set to 0 (= the dataset mean after normalization) at a
        random centre per sample; squares near the border are clipped; 0 = off.

    Steps run in the order crop -> flip -> cutout. Each step is a method taking
    (batch, generator), so a new option is one field plus one method in `__call__`.
    """

    crop_padding: int = 0
    flip: bool = False
    alternate_flip: bool = False
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(
                f"augmentation.crop_padding must be >= 0, got {self.crop_padding}"
            )
        if self.cutout < 0:
            raise ValueError(f"augmentation.cutout must be >= 0, got {self.cutout}")
        if self.alternate_flip and not self.flip:
            raise ValueError("augmentation.alternate_flip needs augmentation.flip: true")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator, *,
                 sample_ids: torch.Tensor | None = None, epoch: int = 0,
                 seed: int = 0) -> torch.Tensor:
        """`sample_ids` (dataset indices of the batch's samples; default 0..n-1), `epoch` and
        `seed` only matter for alternate_flip."""
        if self.crop_padding > 0:
            x = self._random_crop(x, generator)
        if self.flip and self.alternate_flip:
            if sample_ids is None:
                sample_ids = torch.arange(x.shape[0], device=x.device)
            flip = alternate_flip_mask(sample_ids, epoch, seed)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        elif self.flip:
            x = self._random_flip(x, generator)
        if self.cutout > 0:
            x = self._cutout(x, generator)
        return x

    def _random_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, channels, height, width = x.shape
        pad = self.crop_padding
        if pad >= height or pad >= width:
            raise EffrunError(
                f"augmentation.crop_padding={pad} must be smaller than the image ({height}x{width})"
            )
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
        if x.device.type == "cpu":
            # One slice copy per distinct offset: 3x faster on CPU than the gather below
            # (measured, batch 1024, pad 2); on GPUs the .tolist() would sync every batch.
            out = torch.empty_like(x)
            offsets = dy * (2 * pad + 1) + dx
            for offset in offsets.unique().tolist():
                top, left = divmod(offset, 2 * pad + 1)
                pick = (offsets == offset).nonzero().squeeze(1)
                out[pick] = padded[pick, :, top : top + height, left : left + width]
            return out
        # One window offset per sample; gather all windows with a single advanced index.
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


def alternate_flip_mask(sample_ids: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Which samples alternating flip mirrors in `epoch`: a fixed pseudo-random bit per
    (seed, sample), inverted in odd epochs. A hash of the index, not a stored table, so it needs
    neither the dataset size nor state."""
    h = (sample_ids.long() + seed * _HASH_SEED % 2**62) * _HASH_MUL  # int64 products wrap
    h = h ^ (h >> 29)
    h = h * _HASH_MUL
    base = ((h >> 40) & 1).bool()  # a high bit: the multiply mixes all low bits into it
    return base ^ bool(epoch % 2)


# Odd 64-bit constants (as signed int64) for the multiplicative hash above.
_HASH_MUL = 0x9E3779B97F4A7C15 - 2**64
_HASH_SEED = 0x632BE59BD9B4E019
