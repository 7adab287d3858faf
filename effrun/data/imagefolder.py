"""Any ImageFolder tree: root/train/<class>/*, with root/test/ (or root/val/) as the test set.

Held in memory (dataset.loader=memory: decoded once into uint8 tensors, cached) or streamed
(dataset.loader=stream: the train split read from its files every epoch, effrun.data.stream);
dataset.loader=auto picks memory when the decoded tree fits the memory budget.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
from omegaconf import MISSING

from effrun.data.image_tree import (
    decode_file,
    decode_listing,
    find_test_split,
    load_tree_splits,
    scan_split,
    warn_about_classes,
)
from effrun.data.splits import (
    _RESAMPLE_STREAM,
    _SUBSET_STREAM,
    _VAL_STREAM,
    DataSplits,
    ImageTreeBase,
    channel_stats,
    sample_indices,
    stratified_take,
)
from effrun.data.stream import SAMPLE_IMAGES, StreamSource
from effrun.data.subset import class_weights, resample_indices, subset_count, subset_mask
from effrun.errors import EffrunError

log = logging.getLogger("effrun")
# auto: the share of available memory the decoded splits may take (training needs the rest).
MEMORY_SHARE = 0.5


@dataclass
class ImageFolderData(ImageTreeBase):
    """Images from root/train/<class>/ and root/test/<class>/ (root/val/ when test/ is absent).

    root: required. image_size: resize every image to image_size x image_size (aspect ratio
    not kept); None keeps the native size, which all images must then share (unless crop_size
    is set). Grey, RGBA and palette images are converted to RGB.
    crop_size (stream): train on random resized crops of crop_size² (RandomResizedCrop's scale
    0.08-1 and ratio 3/4-4/3); held-out images are resized to crop_size / 0.875 on the shorter
    side and centre-cropped (the ImageNet recipe).
    workers (stream): DataLoader processes decoding training images; 0 decodes in the main one.
    memory_budget_gb (auto): memory the decoded splits may take; None = half of the available
    memory (or of a container's cgroup limit), divided among the processes of this node
    (torchrun's LOCAL_WORLD_SIZE).
    """

    root: str = MISSING
    image_size: Optional[int] = None
    crop_size: Optional[int] = None
    workers: int = 4
    memory_budget_gb: Optional[float] = None
    can_stream: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"dataset.image_size must be >= 1 or null, got {self.image_size}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"dataset.crop_size must be >= 1 or null, got {self.crop_size}")
        if self.crop_size is not None and self.loader == "memory":
            raise ValueError("dataset.crop_size (random resized crops of the source images) needs "
                             "dataset.loader=stream or auto")
        if self.workers < 0:
            raise ValueError(f"dataset.workers must be >= 0, got {self.workers}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ValueError("dataset.memory_budget_gb must be > 0 or null, got "
                             f"{self.memory_budget_gb}")

    def load(self, seed: int) -> DataSplits:
        self.validate()
        root = self._tree_root()
        if self.resolved_loader() == "memory":
            return super().load(seed)
        return self._stream_splits(root, seed)

    def _load_full(self, seed: int) -> DataSplits:
        return load_tree_splits(self._tree_root(), image_size=self.image_size,
                                cache_dir=self.resolved_cache_dir(),
                                skip_bad=self.skip_bad_images)

    def _tree_root(self) -> Path:
        if self.root == MISSING or not self.root:
            raise EffrunError("dataset.root must be set to a folder with train/ and test/ inside")
        root = Path(self.root).expanduser()
        if not (root / "train").is_dir():
            raise EffrunError(
                f"no ImageFolder tree under {root}: set dataset.root=<dir with train/<class>/ "
                "and test/<class>/ (or val/<class>/) folders>"
            )
        return root.resolve()

    def memory_budget(self) -> int:
        """Bytes the decoded splits may take (see memory_budget_gb)."""
        if self.memory_budget_gb is not None:
            return int(self.memory_budget_gb * 2**30)
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return int(available_memory() * MEMORY_SHARE / processes)

    def _decide_loader(self) -> str:
        """auto's choice, logged with its reason: the decoded size of every split (N x 3 x H x W
        bytes at the decode size) against memory_budget()."""
        if self.crop_size is not None:
            log.info("dataset.loader=auto: stream (dataset.crop_size's random resized crops "
                     "read the source images)")
            return "stream"
        root = self._tree_root()
        train_files, _, classes = scan_split(root / "train")
        test_files, _, _ = scan_split(root / find_test_split(root), classes)
        if self.image_size is not None:
            height = width = self.image_size
        else:  # the memory path needs one native size: the first image's
            height, width = decode_file(train_files[0]).shape[-2:]
        count = len(train_files) + len(test_files)
        need, budget = count * 3 * height * width, self.memory_budget()
        choice = "memory" if need <= budget else "stream"
        log.info("dataset.loader=auto: %s (%d images decoded at %dx%d take %.2f GB; memory "
                 "budget %.2f GB)", choice, count, height, width, need / 2**30, budget / 2**30)
        return choice

    def _stream_splits(self, root: Path, seed: int) -> DataSplits:
        """The train split as files; a decoded sample of it, val and test decoded (cached)."""
        test_split = find_test_split(root)
        files, labels, classes = scan_split(root / "train")
        test_files, test_labels, _ = scan_split(root / test_split, classes)
        warn_about_classes(root, {"train": (files, labels), test_split: (test_files, test_labels)},
                           classes)
        all_labels = torch.tensor(labels, dtype=torch.int64)
        train_idx, val_idx, weights = self._carve(all_labels, len(classes), seed)
        sample = train_idx[sample_indices(len(train_idx), SAMPLE_IMAGES, seed)].tolist()
        # Two cache files: the test split's does not depend on the seed (a seed sweep shares
        # it); the sample's and val's do.
        drawn = {"sample": ([files[i] for i in sample], [labels[i] for i in sample])}
        if val_idx is not None:
            drawn["val"] = ([files[i] for i in val_idx], [labels[i] for i in val_idx])
        tree = {}
        for listing in ({test_split: (test_files, test_labels)}, drawn):
            tree.update(decode_listing(root, listing, classes, image_size=self.image_size,
                                       center_crop=self.crop_size,
                                       cache_dir=self.resolved_cache_dir(),
                                       skip_bad=self.skip_bad_images))
        source = StreamSource(
            root=str(root),
            files=np.array([os.fsencode(files[i].relative_to(root)) for i in train_idx.tolist()]),
            labels=all_labels[train_idx].clone(), image_size=self.image_size,
            crop_size=self.crop_size, shape=tuple(tree["sample_x"].shape[1:]),
            workers=self.workers, skip_bad=self.skip_bad_images)
        log.info("dataset.loader=stream: %d training images read from %s each epoch by %d "
                 "worker process(es)", len(source), root / "train", self.workers)
        mean, std = channel_stats(tree["sample_x"])
        return DataSplits(train_x=tree["sample_x"], train_y=tree["sample_y"],
                          test_x=tree[f"{test_split}_x"], test_y=tree[f"{test_split}_y"],
                          val_x=tree.get("val_x"), val_y=tree.get("val_y"), classes=classes,
                          mean=mean, std=std, train_stream=source, class_weights=weights)

    def _carve(self, labels: torch.Tensor, num_classes: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(train indices, val indices or None, class weights or None) into the train files:
        splits.finish_splits's carving (same functions, same seeds) on indices instead of
        images, so both paths hold out the same val images and train on the same subset."""
        train_idx, val_idx = torch.arange(len(labels)), None
        if self.val_fraction > 0:
            in_val = stratified_take(labels, self.val_fraction, seed + _VAL_STREAM)
            train_idx, val_idx = train_idx[~in_val], train_idx[in_val]
        count = subset_count(len(train_idx), self.train_fraction, self.train_size)
        if count < len(train_idx):
            keep = subset_mask(labels[train_idx], count, self.selection, seed + _SUBSET_STREAM)
            train_idx = train_idx[keep]
        if self.balance == "resample":
            train_idx = train_idx[resample_indices(labels[train_idx], seed + _RESAMPLE_STREAM)]
        weights = (class_weights(labels[train_idx], num_classes)
                   if self.balance == "loss_weights" else None)
        return train_idx, val_idx, weights


def available_memory() -> int:
    """Bytes this process can still use: the machine's available memory, or less where a
    cgroup (v2) limit says so (containers: /proc/meminfo shows the whole host)."""
    import psutil

    available = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return available
    return available if limit == "max" else min(available, max(0, int(limit) - used))
