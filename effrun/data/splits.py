"""The tensors every dataset produces, and the shared config base that carves val/train subsets."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Seeds for the two carving steps are offset so the val split and the train subset draw from
# independent streams: changing train_fraction never changes which samples land in val.
_VAL_STREAM = 0
_SUBSET_STREAM = 1_000_003


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
    train_fraction: share of the remaining train set actually used (stratified subset).
    """

    val_fraction: float = 0.0
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(
                f"dataset.train_fraction must be in (0, 1], got {self.train_fraction}"
            )

    def _load_full(self, seed: int) -> DataSplits:
        """Return train/test at full size (no val, stats unset); `load` does the rest."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_full")

    def load(self, seed: int) -> DataSplits:
        self.validate()
        full = self._load_full(seed)
        return finish_splits(full, self.val_fraction, self.train_fraction, seed)



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
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)

    # Per-class quota by largest remainder so the quotas sum exactly to the target.
    ideal = counts.double() * (target / n)
    quota = ideal.floor().long()
    leftover = target - int(quota.sum())
    if leftover > 0:
        order = torch.argsort(ideal - quota.double(), descending=True, stable=True)
        quota[order[:leftover]] += 1

    # Shuffle, then group by class (stable sort keeps the shuffle inside each class),
    # and take the first `quota[c]` of each class group.
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    grouped_labels = labels[grouped]
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - class_start[grouped_labels]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[grouped[rank_in_class < quota[grouped_labels]]] = True
    return mask


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
    full: DataSplits, val_fraction: float, train_fraction: float, seed: int
) -> DataSplits:
    """Carve val from train, subset the rest, and compute normalization stats on what is left."""
    train_x, train_y = full.train_x, full.train_y
    val_x = val_y = None
    if val_fraction > 0:
        in_val = stratified_take(train_y, val_fraction, seed + _VAL_STREAM)
        val_x, val_y = train_x[in_val].contiguous(), train_y[in_val].contiguous()
        train_x, train_y = train_x[~in_val], train_y[~in_val]
    if train_fraction < 1:
        keep = stratified_take(train_y, train_fraction, seed + _SUBSET_STREAM)
        train_x, train_y = train_x[keep], train_y[keep]
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
    )
