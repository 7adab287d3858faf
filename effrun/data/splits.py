"""The tensors every dataset produces, and the shared config base that carves val/train subsets."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from effrun.data.subset import (
    BALANCES,
    SELECTIONS,
    class_weights,
    proportional_quotas,
    resample_indices,
    shuffled,
    subset_count,
    subset_mask,
    take_per_class,
)

# Seeds for the two carving steps are offset so the val split and the train subset draw from
# independent streams: changing train_fraction never changes which samples land in val.
_VAL_STREAM = 0
_SUBSET_STREAM = 1_000_003
_RESAMPLE_STREAM = 2_000_029


@dataclass
class DataSplits:
    """Whole splits held as uint8 NCHW tensors; BatchLoader turns them into normalized batches."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # dataset.loader=stream: the train split as files (effrun.data.stream.StreamSource), read
    # each epoch; train_x/train_y then hold only a decoded sample of it (calibration, init).
    train_stream: Any = None
    # dataset.balance=loss_weights: the training cross-entropy's weight per class (float32,
    # effrun.data.subset.class_weights); None = unweighted.
    class_weights: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        """Images in the train split (streamed or in memory)."""
        return len(self.train_stream) if self.train_stream is not None else len(self.train_y)

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.train_y.max()) + 1

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[-2]), int(self.train_x.shape[-1])


@dataclass
class DatasetBase:
    """Fields every dataset config shares. Subclasses implement `_load_full(seed)`.

    val_fraction: share of the train set held out as validation (stratified by class).
    train_fraction / train_size: share / count of the remaining train set actually used, drawn
    by `selection`; `balance` evens out imbalanced classes (effrun/data/subset.py).
    """

    val_fraction: float = 0.0
    train_fraction: float = 1.0
    train_size: Optional[int] = None  # a count instead of train_fraction; null = use the share
    selection: str = "stratified"  # stratified | class_balanced | random
    balance: str = "none"  # none | resample | loss_weights
    # memory: splits decoded into uint8 tensors; stream: the train split read from its files
    # every epoch (image trees, effrun.data.stream); auto: stream when decoding would not fit.
    loader: str = "memory"
    can_stream: ClassVar[bool] = False  # datasets that can stream set it (ImageFolderData)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.loader not in ("memory", "stream", "auto"):
            raise ValueError(f"dataset.loader must be memory, stream or auto, got {self.loader!r}")
        if self.loader == "stream" and not self.can_stream:
            raise ValueError("dataset.loader=stream reads image trees: use dataset=imagefolder "
                             "dataset.root=<dir with train/<class>/ and test/<class>/>")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(
                f"dataset.train_fraction must be in (0, 1], got {self.train_fraction}"
            )
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"dataset.train_size must be >= 1 or null, got {self.train_size}")
        if self.train_size is not None and self.train_fraction < 1:
            raise ValueError("set dataset.train_fraction or dataset.train_size, not both (got "
                             f"{self.train_fraction} and {self.train_size})")
        if self.selection not in SELECTIONS:
            raise ValueError(f"dataset.selection must be one of {SELECTIONS}, "
                             f"got {self.selection!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"dataset.balance must be one of {BALANCES}, got {self.balance!r}")

    def resolved_loader(self) -> str:
        """`loader` with `auto` decided: "memory" or "stream". Decided once per config, on
        rank 0 under torchrun (every rank must take the same path; each rank's free memory
        differs a little), then kept: the stage keys (effrun.keys) hold it, not `auto`."""
        if self.loader != "auto":
            return self.loader
        if getattr(self, "_resolved_loader", None) is None:
            from effrun import distributed  # the data package stays free of the runner

            self._resolved_loader = distributed.on_main(self._decide_loader)
        return self._resolved_loader

    def _decide_loader(self) -> str:
        """auto's choice; a dataset that cannot stream is held in memory."""
        return "memory"

    def _load_full(self, seed: int) -> DataSplits:
        """Return train/test at full size (no val, stats unset); `load` does the rest."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_full")

    def load(self, seed: int) -> DataSplits:
        self.validate()
        full = self._load_full(seed)
        return finish_splits(full, self.val_fraction, self.train_fraction, seed,
                             train_size=self.train_size, selection=self.selection,
                             balance=self.balance)


# The subset keys of issue 13 at their defaults (the data drawn as before they existed): stage
# keys leave them out (effrun.keys), so keys made before them stay the same.
SUBSET_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DatasetBase)
                   if f.name in ("train_size", "selection", "balance")}


@dataclass
class ImageTreeBase(DatasetBase):
    """Datasets decoded from image files: cache_dir is where the decoded tensors are cached;
    None -> $EFFRUN_CACHE_DIR or ~/.cache/effrun (never beside the data). An image file that
    does not decode (truncated, empty, not an image) stops the run with one line naming it;
    skip_bad_images=true leaves such files out with one warning listing them."""

    cache_dir: str | None = None
    skip_bad_images: bool = False

    def resolved_cache_dir(self) -> Path:
        return resolve_cache_dir(self.cache_dir)


def sample_indices(n: int, count: int, seed: int) -> torch.Tensor:
    """`count` distinct indices of range(n), drawn at random from `seed` (all of them, shuffled,
    when count >= n). The one seeded sampler of training images: model init, calibration-free
    scoring samples, importance batches all draw through it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]


def resolve_cache_dir(cache_dir: str | None) -> Path:
    chosen = cache_dir or os.environ.get("EFFRUN_CACHE_DIR") or "~/.cache/effrun"
    return Path(chosen).expanduser()


def stratified_take(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask selecting round(fraction * N) samples, split across classes in proportion.

    At least one sample is taken and at least one left out, so neither side is ever empty.
    Deterministic from (labels, fraction, seed).
    """
    n = labels.numel()
    target = min(max(1, round(fraction * n)), n - 1)
    quota = proportional_quotas(torch.bincount(labels), target)
    return take_per_class(labels, quota, shuffled(n, seed))


def channel_stats(x: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std of a uint8 NCHW tensor in 0..1 scale.

    Exact and fast: a 256-bin histogram per channel instead of float sums over all pixels.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in range(x.shape[1]):
        hist = torch.bincount(x[:, channel].reshape(-1), minlength=256).double()
        count = hist.sum()
        mean = float(hist @ values / count)
        var = max(float(hist @ (values * values) / count) - mean * mean, 0.0)
        means.append(mean / 255.0)
        stds.append(max(math.sqrt(var) / 255.0, 1e-6))
    return tuple(means), tuple(stds)


def finish_splits(
    full: DataSplits, val_fraction: float, train_fraction: float, seed: int, *,
    train_size: int | None = None, selection: str = "stratified", balance: str = "none",
) -> DataSplits:
    """Carve val from train, subset the rest (`train_fraction` or `train_size`, drawn by
    `selection`), rebalance it (`balance`), and compute normalization stats on what training
    sees (effrun/data/subset.py)."""
    train_x, train_y = full.train_x, full.train_y
    val_x = val_y = None
    if val_fraction > 0:
        in_val = stratified_take(train_y, val_fraction, seed + _VAL_STREAM)
        val_x, val_y = train_x[in_val].contiguous(), train_y[in_val].contiguous()
        train_x, train_y = train_x[~in_val], train_y[~in_val]
    count = subset_count(len(train_y), train_fraction, train_size)
    if count < len(train_y):
        keep = subset_mask(train_y, count, selection, seed + _SUBSET_STREAM)
        train_x, train_y = train_x[keep], train_y[keep]
    if balance == "resample":
        copies = resample_indices(train_y, seed + _RESAMPLE_STREAM)
        train_x, train_y = train_x[copies], train_y[copies]
    num_classes = len(full.classes) or int(full.train_y.max()) + 1
    weights = class_weights(train_y, num_classes) if balance == "loss_weights" else None
    train_x, train_y = train_x.contiguous(), train_y.contiguous()
    mean, std = channel_stats(train_x)
    return DataSplits(
        train_x=train_x,
        train_y=train_y,
        test_x=full.test_x.contiguous(),
        test_y=full.test_y.contiguous(),
        val_x=val_x,
        val_y=val_y,
        classes=list(full.classes),
        mean=mean,
        std=std,
        class_weights=weights,
    )
