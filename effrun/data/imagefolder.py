"""Any ImageFolder tree: root/train/<class>/*, with root/test/ (or root/val/) as the test set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from effrun.data.image_tree import load_tree_splits
from effrun.data.splits import DataSplits, ImageTreeBase
from effrun.errors import EffrunError


@dataclass
class ImageFolderData(ImageTreeBase):
    """Images from root/train/<class>/ and root/test/<class>/ (root/val/ when test/ is absent).

    root: required. image_size: resize every image to image_size x image_size (aspect ratio
    not kept); None keeps the native size, which all images must then share.
    Grey, RGBA and palette images are converted to RGB. Decoded once, then read from the
    cache (see effrun.data.image_tree).
    """

    root: str = MISSING
    image_size: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"dataset.image_size must be >= 1 or null, got {self.image_size}")

    def _load_full(self, seed: int) -> DataSplits:
        if self.root == MISSING or not self.root:
            raise EffrunError("dataset.root must be set to a folder with train/ and test/ inside")
        root = Path(self.root).expanduser()
        if not (root / "train").is_dir():
            raise EffrunError(
                f"no ImageFolder tree under {root}: set dataset.root=<dir with train/<class>/ "
                "and test/<class>/ (or val/<class>/) folders>"
            )
        return load_tree_splits(root, image_size=self.image_size,
                                cache_dir=self.resolved_cache_dir(),
                                skip_bad=self.skip_bad_images)
