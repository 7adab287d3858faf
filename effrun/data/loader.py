"""A DataLoader replacement for in-memory uint8 image tensors: whole-batch work on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from effrun.data.augment import Augmentation

# Mixes (seed, epoch) into one generator seed; an odd 64-bit constant spreads nearby seeds.
_SEED_MIX = 0x9E3779B97F4A7C15


class BatchLoader:
    """Yields `(inputs, labels)` batches from uint8 images already held in memory; labels are
    class indices, or soft (N, num_classes) rows when the augmentation mixes (mixup, CutMix).

    The uint8 images and labels move to `device` once. Each batch is gathered, converted to
    `dtype`, normalized with `mean`/`std` (0..1 scale, as in DataSplits), augmented as a whole
    batch, and optionally put in channels_last. Shuffle order and augmentation draw from one
    torch.Generator on the device, re-seeded from (seed, epoch) at the start of every pass:
    call `set_epoch(e)` before a pass to pin it; without it passes use epochs 0, 1, 2, ...

    With `world_size` > 1 (torchrun, effrun/distributed.py) every rank draws the same order and
    takes every `world_size`-th sample from `rank` on, as torch's DistributedSampler does (the
    order padded with its first samples to a multiple of the world size, so every rank takes
    the same number of steps); `batch_size` is then the rank's share of the global batch, and
    the ranks' batches k together are the global batch k of one process. Augmentation draws
    then differ per rank.
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
        rank: int = 0,
        world_size: int = 1,
        num_classes: int | None = None,
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"BatchLoader needs uint8 NCHW images, got {x.dtype} {tuple(x.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"BatchLoader got {x.shape[0]} images but {y.shape[0]} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader needs 0 <= rank < world_size, got {rank}, {world_size}")
        if len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise ValueError(f"mean/std need {x.shape[1]} values, got {len(mean)} and {len(std)}")

        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment if augment is not None and augment.enabled else None
        # A mix's soft labels need the class count (default: the largest label + 1).
        self.num_classes = num_classes
        if self.augment is not None:
            if num_classes is None and self.augment.mix != "none":
                self.num_classes = int(self.y.max()) + 1 if len(self.y) else 0
            self.augment.check_data(self.x, self.num_classes)
        self.channels_last = channels_last
        self.seed = seed
        self.dtype = dtype
        self.rank, self.world_size = rank, world_size
        # Normalization folded into one multiply-add on 0..255 values: (x/255 - mean) / std.
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=self.device)
        self._epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples of this rank's shard per pass (all of them with one rank)."""
        return math.ceil(int(self.x.shape[0]) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:  # whole global batches only: the padding is never reached
            return int(self.x.shape[0]) // (self.batch_size * self.world_size)
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        self._generator.manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
        total = int(self.x.shape[0])
        if self.shuffle:
            order = torch.randperm(total, generator=self._generator, device=self.device)
        else:
            order = None
        if self.world_size > 1:
            order = self._shard(order, total)
            # Augmentation draws its own numbers on each rank (the order above is shared).
            self._generator.manual_seed(
                ((self.seed * _SEED_MIX + epoch) * _SEED_MIX + self.rank + 1) % 2**63)
        # Host-side draws (a mix's lambda and box) need no device sync: numpy, seeded alike.
        host_rng = np.random.default_rng([(self.seed * _SEED_MIX + epoch) % 2**63, self.rank])
        for batch in range(len(self)):
            start = batch * self.batch_size
            if order is None:
                idx = slice(start, start + self.batch_size)
                images, labels = self.x[idx], self.y[idx]
            else:
                idx = order[start : start + self.batch_size]
                images, labels = self.x[idx], self.y[idx]
            yield self._prepare(images, labels, idx, epoch, host_rng)

    def _shard(self, order: torch.Tensor | None, total: int) -> torch.Tensor:
        """This rank's samples of the pass's `order` (None: 0..total-1), DistributedSampler's
        way: padded with its first samples to a multiple of the world size, then every
        `world_size`-th from `rank`."""
        if order is None:
            order = torch.arange(total, device=self.device)
        padded = self.num_samples * self.world_size
        if padded > total:
            order = order.repeat(math.ceil(padded / total))[:padded]
        return order[self.rank :: self.world_size]

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor | slice,
                 epoch: int, host_rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels): labels turn soft (N, num_classes) under a mix."""
        if self.augment is not None and isinstance(idx, slice):
            idx = torch.arange(idx.start, idx.start + len(images), device=self.device)
        return prepare_batch(self, images, labels, idx, epoch, host_rng)


def prepare_batch(loader, images: torch.Tensor, labels: torch.Tensor, sample_ids,
                  epoch: int, host_rng) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps every loader (BatchLoader, the streaming one) runs on a uint8 batch on its
    device: op policy, normalize, crop/flip/cutout in float32, mix, cast, memory format. The
    loader gives its augmentation, generator, normalization, seed, class count, dtype and
    channels_last; `host_rng` draws a mix's lambda (None without augmentation)."""
    augment = loader.augment
    if augment is not None:  # op policies (posterize, equalize, ...) need uint8
        images = augment.apply_policy(images, loader._generator)
    # Normalize and augment in float32 so low-precision dtypes only see the final values.
    inputs = images.float() * loader._scale + loader._shift
    if augment is not None:
        inputs = augment(inputs, loader._generator, sample_ids=sample_ids, epoch=epoch,
                         seed=loader.seed)
        inputs, labels = augment.mix_batch(inputs, labels, loader._generator, host_rng,
                                           loader.num_classes)
    inputs = inputs.to(loader.dtype)
    if loader.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, labels
