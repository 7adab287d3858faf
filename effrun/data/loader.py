"""A DataLoader replacement for in-memory uint8 image tensors: whole-batch work on the device."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from effrun.data.augment import Augmentation

# Mixes (seed, epoch, ...) into one generator seed; an odd 64-bit constant spreads nearby seeds.
_SEED_MIX = 0x9E3779B97F4A7C15


def mixed_seed(*values: int) -> int:
    out = 0
    for value in values:
        out = (out * _SEED_MIX + value) % 2**63
    return out


class BatchLoader:
    """Yields `(inputs, labels)` batches from uint8 images already held in memory; labels are
    class indices, or soft (N, num_classes) rows when the augmentation mixes (mixup, CutMix).

    The uint8 images and labels move to `device` once. Each batch is gathered, converted to
    `dtype`, normalized with `mean`/`std` (0..1 scale, as in DataSplits), augmented as a whole
    batch, and optionally put in channels_last. The shuffle order comes from a torch.Generator
    on the device seeded from (seed, epoch); each batch's augmentation draws from it re-seeded
    from (seed, epoch, batch, rank), as StreamLoader does. Call `set_epoch(e)` before a pass to
    pin it; without it passes use epochs 0, 1, 2, ... `state_dict()` is the position (epoch,
    batches done in it); after `load_state_dict` the next pass continues from there with the
    batches an uninterrupted pass would have yielded (a mid-epoch resume, effrun/train.py).

    With `world_size` > 1 (torchrun, effrun/distributed.py) every rank draws the same order and
    takes every `world_size`-th sample from `rank` on, as torch's DistributedSampler does (the
    order padded with its first samples to a multiple of the world size, so every rank takes
    the same number of steps); `batch_size` is then the rank's share of the global batch, and
    the ranks' batches k together are the global batch k of one process. Augmentation draws
    then differ per rank. Draws from (seed, epoch, batch, rank) rather than from one generator
    running through the pass make the position alone enough to continue a pass: no generator
    state to store, and none that differs between ranks (the ranks resume from rank 0's file).
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
        # The next pass's epoch; where the pass under way stands (epoch, batches done); the
        # batch the next pass starts at (load_state_dict).
        self._epoch, self._at, self._resume_at = 0, (0, 0), 0

    @property
    def num_samples(self) -> int:
        """Samples of this rank's shard per pass (all of them with one rank)."""
        return math.ceil(int(self.x.shape[0]) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:  # whole global batches only: the padding is never reached
            return int(self.x.shape[0]) // (self.batch_size * self.world_size)
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._at, self._resume_at = epoch, (epoch, 0), 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._at[0], "batch": self._at[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._resume_at = int(state["epoch"]), int(state["batch"])
        self._at = (self._epoch, self._resume_at)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._resume_at
        self._epoch, self._resume_at = epoch + 1, 0
        self._generator.manual_seed((self.seed * _SEED_MIX + epoch) % 2**63)
        total = int(self.x.shape[0])
        if self.shuffle:
            order = torch.randperm(total, generator=self._generator, device=self.device)
        else:
            order = None
        if self.world_size > 1:
            order = self._shard(order, total)  # the same order on every rank, then its share
        for batch in range(start, len(self)):
            first = batch * self.batch_size
            if order is None:
                idx = slice(first, first + self.batch_size)
                images, labels = self.x[idx], self.y[idx]
            else:
                idx = order[first : first + self.batch_size]
                images, labels = self.x[idx], self.y[idx]
            self._at = (epoch, batch + 1)
            yield self._prepare(images, labels, idx, epoch, batch)
        self._at = (epoch + 1, 0)

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
                 epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels): labels turn soft (N, num_classes) under a mix. Each rank draws
        its own numbers; host-side draws (a mix's lambda and box) come from numpy, seeded alike,
        so they need no device sync."""
        host_rng = None
        if self.augment is not None:
            if isinstance(idx, slice):
                idx = torch.arange(idx.start, idx.start + len(images), device=self.device)
            self._generator.manual_seed(mixed_seed(self.seed, epoch, batch, self.rank))
            host_rng = np.random.default_rng([mixed_seed(self.seed, epoch, batch), self.rank])
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
