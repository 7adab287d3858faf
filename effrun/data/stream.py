"""The streaming data path (dataset.loader=stream): the train split read from its image files
every epoch, for trees whose decoded images do not fit in memory (ImageNet at 224² is ~190 GB).

Design. A streamed dataset never holds the train split in memory. `DataSplits.train_stream` is a
`StreamSource`: the files as one numpy bytes array (no per-file Python objects, so forked worker
processes do not copy them page by page as reference counts change) and an int64 label tensor.
`train_x`/`train_y` then hold a decoded sample (`SAMPLE_IMAGES`, centre-cropped like the
held-out images) for the consumers that need a few images: model init, quantization
calibration, prune importance batches, export shapes, normalization statistics.

`train_loader` is the one place `fit` gets its training batches: a `BatchLoader` over decoded
tensors, or a `StreamLoader` with the same interface (`__iter__` yields normalized
`(inputs, labels)` on the device, `__len__`, `set_epoch`), plus `state_dict`/`load_state_dict`:
the position within an epoch, so a loader can continue mid-epoch: `fit` stores it in its
mid-epoch checkpoints (train.checkpoint_every) and resumes a long epoch at the next batch.

Per sample, in DataLoader worker processes: decode, the dataset's resize (`image_size`) and,
with `crop_size`, torchvision.transforms.v2's resized crop (RandomResizedCrop's scale and ratio
ranges). Its randomness comes from (seed, epoch, sample index), not from the worker's RNG, so
the batches are the same for any number of workers and after a resume. The augmentation group
(op policies, crop with padding, flip, cutout, mixup/CutMix) then runs on the whole batch on the
training device, the same code and order as the memory path: those steps act on fixed-size
images and cost little there, and one implementation keeps the two paths' augmentation
identical (alternate_flip gets the sample indices it needs).

Held-out splits (val, test) are decoded into memory at the evaluation crop, through the cache:
every stage (prune scoring, quantize fallback, benchmark accuracy) evaluates on those tensors,
and they are small next to a train split (ImageNet's 50k val images at 224² are 7.5 GB); the
cache file is memory-mapped, so the ranks of a node share one copy.

Sharding follows torch's DistributedSampler (it is one): each of `world_size` ranks takes every
world_size-th index of the epoch's seeded permutation, padded so all ranks get equally many.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from effrun.data.augment import Augmentation
from effrun.data.image_tree import decode_error, decode_file
from effrun.data.loader import BatchLoader, mixed_seed, prepare_batch
from effrun.errors import EffrunError

log = logging.getLogger("effrun")

# Decoded train images kept in memory for consumers that need a few (calibration, init).
SAMPLE_IMAGES = 1024
# RandomResizedCrop's ranges (torchvision's defaults, the ImageNet recipe's).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass
class StreamSource:
    """A train split as files: `files[i]` (os.fsencode'd, relative to root) has label
    `labels[i]`. Each sample is decoded, resized to image_size² (if set) and randomly
    resized-cropped to crop_size² (if set); `shape` is every sample's resulting [C, H, W]."""

    root: str
    files: np.ndarray
    labels: torch.Tensor
    image_size: int | None
    crop_size: int | None
    shape: tuple[int, int, int]
    workers: int
    skip_bad: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> Path:
        return Path(self.root) / os.fsdecode(self.files[index])


def resized_crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering CROP_SCALE of the area at an aspect ratio in
    CROP_RATIO (log-uniform): RandomResizedCrop's rule, drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # No fit in 10 draws (extreme aspect ratios): the central crop at the nearest allowed ratio.
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TreeImages(Dataset):
    """Map-style dataset over a StreamSource; a key is (index, epoch), as the sampler yields
    them, and a sample is (uint8 [C,H,W], label, index of the image actually read)."""

    def __init__(self, source: StreamSource, seed: int) -> None:
        self.source = source
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, epoch = key
        image, index = self._decode(index)
        crop = self.source.crop_size
        if crop is not None:
            from torchvision.transforms.v2 import functional as TF

            rng = random.Random(mixed_seed(self.seed, epoch, index))
            top, left, h, w = resized_crop_box(image.shape[-2], image.shape[-1], rng)
            image = TF.resized_crop(image, top, left, h, w, [crop, crop], antialias=True)
        if tuple(image.shape) != self.source.shape:
            raise EffrunError(f"images differ in size ({self.source.path(index)}: "
                              f"{tuple(image.shape[1:])}, others: {self.source.shape[1:]}): set "
                              "dataset.image_size=<int> or dataset.crop_size=<int>")
        return image, int(self.source.labels[index]), index

    def _decode(self, index: int) -> tuple[torch.Tensor, int]:
        """The image at `index`; with skip_bad, the next one that decodes in its place."""
        for attempt in range(len(self.source)):
            at = (index + attempt) % len(self.source)
            path = self.source.path(at)
            try:
                return decode_file(path, self.source.image_size), at
            except Exception as err:  # torchvision's RuntimeError, PIL's OSError, ...
                if not self.source.skip_bad:
                    raise EffrunError(f"cannot decode image {path}: {decode_error(err)} (set "
                                      "dataset.skip_bad_images=true to skip such files)"
                                      ) from None
                log.warning("skipped image file %s that does not decode: %s", path,
                            decode_error(err))
        raise EffrunError(f"no image under {self.source.root} could be decoded")


class ShardSampler(DistributedSampler):
    """DistributedSampler (this rank's share of the epoch's seeded permutation) that yields
    (index, epoch) keys, from `skip` samples into its share up to `limit` of them."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.skip, self.limit = 0, self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip:self.limit]
        return iter([(index, self.epoch) for index in indices])

    def __len__(self) -> int:
        return max(0, self.limit - self.skip)


class StreamLoader:
    """Yields `(inputs, labels)` batches on `device` from the files of a StreamSource, decoded
    by `source.workers` DataLoader processes (0: in this process); the interface of BatchLoader.

    Pinned memory on CUDA. Passes use epochs 0, 1, 2, ... unless `set_epoch(e)` pins one;
    `state_dict()` is the position (epoch, batches done in it) and `load_state_dict` makes the
    next pass continue from there with the batches an uninterrupted pass would have yielded.
    Under DDP `batch_size` is this rank's share of the global batch; with drop_last, only
    whole global batches are read (BatchLoader's rule).
    """

    def __init__(self, source: StreamSource, batch_size: int, *, mean: Sequence[float],
                 std: Sequence[float], shuffle: bool = False, drop_last: bool = False,
                 augment: Augmentation | None = None, device: str | torch.device = "cpu",
                 channels_last: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                 rank: int = 0, world_size: int = 1, num_classes: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.device = torch.device(device)
        self.batch_size, self.drop_last, self.seed, self.dtype = batch_size, drop_last, seed, dtype
        self.augment = augment if augment is not None and augment.enabled else None
        # A mix's soft labels need the class count (default: the largest label + 1).
        self.num_classes = num_classes or int(source.labels.max()) + 1
        if self.augment is not None:
            self.augment.check_data(torch.empty((1, *source.shape), dtype=torch.uint8),
                                    self.num_classes)
        self.channels_last = channels_last
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1)
        self._generator = torch.Generator(device=self.device)
        self.rank, self.world_size = rank, world_size
        self._sampler = ShardSampler(len(source), shuffle=shuffle, seed=seed, rank=rank,
                                     world_size=world_size)
        self._sampler.limit = min(self.num_samples, len(self) * batch_size)
        self._loader = DataLoader(TreeImages(source, seed), batch_size=batch_size,
                                  sampler=self._sampler, num_workers=source.workers,
                                  pin_memory=self.device.type == "cuda",
                                  persistent_workers=source.workers > 0)
        self._epoch, self._done, self._resume_at = 0, 0, 0

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch."""
        return self._sampler.num_samples

    def __len__(self) -> int:
        if self.drop_last:  # whole global batches only (as BatchLoader): padding never read
            return len(self._sampler.dataset) // (self.batch_size * self.world_size)
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._done, self._resume_at = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch, self._done = int(state["epoch"]), int(state["batch"])
        self._resume_at = self._done

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._resume_at
        self._done, self._resume_at = start, 0
        self._sampler.set_epoch(epoch)
        self._sampler.skip = start * self.batch_size
        try:
            for batch, (images, labels, ids) in enumerate(self._loader, start=start):
                self._done = batch + 1
                yield self._prepare(images, labels, ids, epoch, batch)
        except EffrunError as err:  # from a worker: keep the one line, drop its traceback
            raise EffrunError(worker_message(err)) from None
        self._epoch, self._done = epoch + 1, 0

    def _prepare(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                 epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As BatchLoader: op policy on uint8, normalize, augment in float32, mix, cast. Draws
        come from (seed, epoch, batch, rank): a pass continued mid-epoch augments as an
        uninterrupted one, and each rank draws its own numbers."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        host_rng = None
        if self.augment is not None:
            self._generator.manual_seed(mixed_seed(self.seed, epoch, batch, self.rank))
            host_rng = np.random.default_rng([mixed_seed(self.seed, epoch, batch), self.rank])
        return prepare_batch(self, images, labels, ids.to(self.device), epoch, host_rng)


def worker_message(err: Exception) -> str:
    """The error's own line: DataLoader re-raises a worker's error with its traceback inside."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last.removeprefix(prefix)


def train_loader(data, batch_size: int, *, augment: Augmentation | None,
                 device: torch.device, channels_last: bool, seed: int, rank: int = 0,
                 world_size: int = 1) -> BatchLoader | StreamLoader:
    """The training batches of `data` (a DataSplits), shuffled and augmented: a StreamLoader
    over its files when it streams, else a BatchLoader over its decoded tensors. `batch_size`
    is this rank's share of the global batch. The last short global batch is dropped unless it
    would be the only one."""
    drop_last = data.num_train > batch_size * world_size
    common = dict(mean=data.mean, std=data.std, shuffle=True, drop_last=drop_last,
                  augment=augment, device=device, channels_last=channels_last, seed=seed,
                  num_classes=data.num_classes)
    if data.train_stream is not None:
        return StreamLoader(data.train_stream, batch_size, rank=rank, world_size=world_size,
                            **common)
    return BatchLoader(data.train_x, data.train_y, batch_size, rank=rank, world_size=world_size,
                       **common)
