"""CIFAR-10/100 from torchvision's pickled batches or from an ImageFolder tree of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from effrun.data.image_tree import load_tree_splits
from effrun.data.splits import DataSplits, ImageTreeBase
from effrun.errors import EffrunError


@dataclass
class _CIFARBase(ImageTreeBase):
    """root: None means ./data/cifar10 (or ./data/cifar100), relative to the working dir.

    Layouts accepted under root, checked in this order:
      1. torchvision's: root/cifar-10-batches-py/ (CIFAR-10) or root/cifar-100-python/
         (CIFAR-100), read straight from its uint8 arrays.
      2. an ImageFolder tree: root/train/<class>/*.png|jpg... and root/test/<class>/ (or val/),
         decoded once and cached (see effrun.data.image_tree); resized to 32x32 if needed.
      3. neither, with download=true: torchvision downloads layout 1 into root.
    Otherwise an EffrunError says which keys to set.
    """

    root: str | None = None
    download: bool = False

    display_name: ClassVar[str] = ""
    torchvision_dir: ClassVar[str] = ""
    default_root: ClassVar[str] = ""

    def _torchvision_class(self) -> type:
        raise NotImplementedError

    def _load_full(self, seed: int) -> DataSplits:
        root = Path(self.root or self.default_root).expanduser()
        if (root / self.torchvision_dir).is_dir():
            return self._load_torchvision(root)
        if (root / "train").is_dir():
            return self._load_tree(root)
        if self.download:
            return self._load_torchvision(root)
        raise EffrunError(
            f"{self.display_name} not found under {root}: set dataset.root=<dir with "
            f"{self.torchvision_dir} or train/ test/ folders>, or dataset.download=true"
        )

    def _load_torchvision(self, root: Path) -> DataSplits:
        dataset_class = self._torchvision_class()
        try:
            train = dataset_class(str(root), train=True, download=self.download)
            test = dataset_class(str(root), train=False, download=self.download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted."
            raise EffrunError(
                f"{self.display_name} under {root}/{self.torchvision_dir} is missing or "
                f"corrupted ({err}): set dataset.download=true or fix dataset.root"
            ) from err
        return DataSplits(
            train_x=_nhwc_to_nchw(train.data),
            train_y=torch.as_tensor(train.targets, dtype=torch.int64),
            test_x=_nhwc_to_nchw(test.data),
            test_y=torch.as_tensor(test.targets, dtype=torch.int64),
            classes=list(train.classes),
        )

    def _load_tree(self, root: Path) -> DataSplits:
        return load_tree_splits(root, image_size=32, cache_dir=self.resolved_cache_dir(),
                                skip_bad=self.skip_bad_images)


def _nhwc_to_nchw(images) -> torch.Tensor:
    """torchvision keeps CIFAR as a uint8 numpy [N, 32, 32, 3] array; no per-image PIL needed."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@dataclass
class CIFAR10Data(_CIFARBase):
    """CIFAR-10: 10 classes, 50k train / 10k test, 32x32. Root and layouts: see _CIFARBase."""

    display_name: ClassVar[str] = "CIFAR-10"
    torchvision_dir: ClassVar[str] = "cifar-10-batches-py"
    default_root: ClassVar[str] = "data/cifar10"

    def _torchvision_class(self) -> type:
        import torchvision  # imported where used: it takes seconds (ops import torch._dynamo)

        return torchvision.datasets.CIFAR10


@dataclass
class CIFAR100Data(_CIFARBase):
    """CIFAR-100: 100 classes, 50k train / 10k test, 32x32. Root and layouts: see _CIFARBase."""

    display_name: ClassVar[str] = "CIFAR-100"
    torchvision_dir: ClassVar[str] = "cifar-100-python"
    default_root: ClassVar[str] = "data/cifar100"

    def _torchvision_class(self) -> type:
        import torchvision

        return torchvision.datasets.CIFAR100
