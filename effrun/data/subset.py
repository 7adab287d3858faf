"""Which training images a run keeps: subsets by share or count, and class rebalancing.

`dataset.train_fraction` (a share) or `dataset.train_size` (a count) keep part of the train
split that is left once val is carved, drawn from the seed by `dataset.selection`:

    stratified      every class keeps its share of the split (largest-remainder quotas); the
                    default, and the subset train_fraction always drew
    class_balanced  the same count from every class; a class with fewer images gives all it
                    has and the rest is spread over the others (water-filling)
    random          a uniform draw: class shares vary by chance

`dataset.balance` evens out imbalanced classes in what training sees:

    none          as drawn
    resample      every class is topped up to the largest class's count with copies drawn with
                  replacement (seeded); an epoch grows to classes x largest count, and each copy
                  gets its own augmentation draw
    loss_weights  the training cross-entropy weights class c by N / (K * n_c) (K classes with
                  images, n_c of them in class c): each class adds the same total weight

All of it is deterministic from (labels, settings, seed). Evaluation is never weighted.
"""

from __future__ import annotations

import torch

from effrun.errors import EffrunError

SELECTIONS = ("stratified", "class_balanced", "random")
BALANCES = ("none", "resample", "loss_weights")


def shuffled(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def require_labels(labels: torch.Tensor, what: str) -> None:
    """`what` needs every training image's class: refuse a split with unlabeled images (-1)."""
    if labels.numel() and int(labels.min()) < 0:
        raise EffrunError(f"{what} needs labels, but the train split has "
                          f"{int((labels < 0).sum())} unlabeled images (label -1)")


def proportional_quotas(counts: torch.Tensor, target: int) -> torch.Tensor:
    """Per-class counts summing to `target`, each class in proportion to `counts`
    (largest remainder)."""
    n = int(counts.sum())
    ideal = counts.double() * (target / n)
    quota = ideal.floor().long()
    leftover = target - int(quota.sum())
    if leftover > 0:
        order = torch.argsort(ideal - quota.double(), descending=True, stable=True)
        quota[order[:leftover]] += 1
    return quota


def balanced_quotas(counts: torch.Tensor, target: int) -> torch.Tensor:
    """Per-class counts summing to `target`, as equal as the classes allow: a class short of
    its equal share gives all it has and the others share the remainder (water-filling); the
    last few extra images go to the lowest class numbers."""
    quota = torch.zeros_like(counts)
    open_classes = counts > 0
    remaining = target
    while remaining > 0:
        share = remaining // int(open_classes.sum())
        if share == 0:  # fewer images left than classes: one each, lowest class number first
            first = torch.nonzero(open_classes).flatten()[:remaining]
            quota[first] += 1
            break
        add = torch.minimum(counts - quota, torch.full_like(counts, share)) * open_classes
        quota += add
        remaining -= int(add.sum())
        open_classes &= quota < counts
    return quota


def take_per_class(labels: torch.Tensor, quota: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the first `quota[c]` images of each class c, in the order `order`
    (a permutation of the indices: a seeded shuffle, or a score ranking)."""
    n = labels.numel()
    counts = torch.bincount(labels, minlength=len(quota))
    grouped = order[torch.argsort(labels[order], stable=True)]  # by class, `order` kept inside
    grouped_labels = labels[grouped]
    class_start = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(n) - class_start[grouped_labels]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[grouped[rank_in_class < quota[grouped_labels]]] = True
    return mask


def subset_mask(labels: torch.Tensor, count: int, selection: str, seed: int) -> torch.Tensor:
    """Boolean mask keeping `count` of the images, drawn by `selection` from `seed`."""
    if selection == "random":
        mask = torch.zeros(labels.numel(), dtype=torch.bool)
        mask[shuffled(labels.numel(), seed)[:count]] = True
        return mask
    require_labels(labels, f"dataset.selection={selection}")
    counts = torch.bincount(labels)
    if selection == "class_balanced":
        classes = int((counts > 0).sum())
        if count < classes:
            raise EffrunError(f"dataset.selection=class_balanced keeps {count} images, fewer "
                              f"than the {classes} classes: keep at least one per class")
        quota = balanced_quotas(counts, count)
    else:
        quota = proportional_quotas(counts, count)
    return take_per_class(labels, quota, shuffled(labels.numel(), seed))


def subset_count(n: int, fraction: float, size: int | None) -> int:
    """How many of `n` training images a subset keeps: `size`, else round(fraction * n), at
    least one."""
    if size is None:
        return max(1, round(fraction * n))
    if size > n:
        raise EffrunError(f"dataset.train_size={size} but the train split has only {n} images "
                          f"(after val): use a smaller size or dataset.train_fraction")
    return size


def resample_indices(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices that top every class up to the largest class's count: each class's images
    once, then copies drawn with replacement from that class (seeded)."""
    require_labels(labels, "dataset.balance=resample")
    counts = torch.bincount(labels)
    largest = int(counts.max())
    generator = torch.Generator().manual_seed(seed)
    extra = []
    for c in torch.nonzero(counts).flatten().tolist():
        members = torch.nonzero(labels == c).flatten()
        draws = torch.randint(len(members), (largest - len(members),), generator=generator)
        extra.append(members[draws])
    return torch.cat([torch.arange(labels.numel()), *extra])


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy weight per class, N / (K * n_c) over the K classes with images (a class
    without images weighs 0: it never appears as a target)."""
    require_labels(labels, "dataset.balance=loss_weights")
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = labels.numel() / (int(present.sum()) * counts[present])
    return weights.float()
