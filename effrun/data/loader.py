"""A DataLoader replacement for in-memory uint8 image tensors: whole-batch work on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from effrun.data.augment import Augmentation

# Mixes (seed, epoch) into one generator seed; an odd 64-bit constant spreads nearby seeds.
_SEED_MIX = 0x9E3779B97F4A7C15


class BatchLoader:
    """Yields `(inputs, labels)` batches from uint8 images already held in memory.

    The uint8 images and labels move to `device` once. Each batch is gathered, converted to
    `dtype`, normalized with `mean`/`std` (0..1 scale, as in DataSplits), augmented as a whole
    batch, and optionally put in channels_last. Shuffle order and augmentation draw from one
    torch.Generator on the device, re-seeded from (seed, epoch) at the start of every pass:
    call `set_epoch(e)` before a pass to pin it; without it passes use epochs 0, 1, 2, ...
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augmentation | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"BatchLoader needs uint8 NCHW images, got {x.dtype} {tuple(x.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"BatchLoader got {x.shape[0]} images but {y.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise ValueError(f"mean/std need {x.shape[1]} values, got {len(mean)} and {len(std)}")

        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.enabled else None
        self.channels_last = channels_last
        self.seed = seed
        self.dtype = dtype
        # Normalization folded into one multiply-add on 0..255 values: (x/255 - mean) / std.
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=self.device)
        self._epoch = 0

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        self._generator.manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=self._generator, device=self.device)
        else:
            order = None
        for batch in range(len(self)):
            start = batch * self.batch_size
            if order is None:
                idx = slice(start, start + self.batch_size)
                images, labels = self.x[idx], self.y[idx]
            else:
                idx = order[start : start + self.batch_size]
                images, labels = self.x[idx], self.y[idx]
            yield self._prepare(images, idx, epoch), labels

    def _prepare(self, images: torch.Tensor, idx: torch.Tensor | slice, epoch: int
                 ) -> torch.Tensor:
        # Normalize and augment in float32 so low-precision dtypes only see the final values.
        inputs = images.float() * self._scale + self._shift
        if self.augment is not None:
            if isinstance(idx, slice):
                idx = torch.arange(idx.start, idx.start + len(images), device=self.device)
            inputs = self.augment(inputs, self._generator, sample_ids=idx, epoch=epoch,
                                  seed=self.seed)
        inputs = inputs.to(self.dtype)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs
