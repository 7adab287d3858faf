"""Read an ImageFolder tree (root/<split>/<class>/<image>) into uint8 tensors, cached on disk.

Decoding tens of thousands of small files is the slow part, so each tree is decoded once and
saved as a single .pt file in the cache dir (never beside the data, which may be read-only).
The cache key covers every file's relative path, size and mtime, plus the preprocessing, so
any change to the tree or to image_size decodes afresh.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, read_file
from tqdm import tqdm

from effrun.data.splits import DataSplits
from effrun.errors import EffrunError

# Bump when decoding or resizing changes, so old cache files stop matching.
_CACHE_FORMAT = 1
# decode_image handles these natively; the rest go through PIL.
_NATIVE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
_PIL_EXTENSIONS = {".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGE_EXTENSIONS = _NATIVE_EXTENSIONS | _PIL_EXTENSIONS


def find_test_split(root: Path) -> str:
    """Name of the held-out split folder: `test/` if present, else `val/`."""
    for name in ("test", "val"):
        if (root / name).is_dir():
            return name
    raise EffrunError(f"no test/ or val/ folder under {root}")


def scan_split(
    split_dir: Path, classes: list[str] | None = None, max_per_class: int | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Image files and labels under split_dir/<class>/, sorted for a stable order.

    `classes` fixes the label order (pass the train classes when scanning test); None takes
    the sorted subfolder names. `max_per_class` keeps only the first files of each class.
    """
    found = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise EffrunError(f"{split_dir} has class folders not in train: {', '.join(unknown)}")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        names = sorted(
            entry.name
            for entry in os.scandir(class_dir)
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
        )
        if max_per_class is not None:
            names = names[:max_per_class]
        files.extend(class_dir / n for n in names)
        labels.extend([label] * len(names))
    if not files:
        raise EffrunError(f"no images found under {split_dir}/<class>/")
    return files, labels, classes


def decode_file(path: Path, image_size: int | None = None) -> torch.Tensor:
    """One image as uint8 [3, H, W] RGB (grey, alpha and palettes converted), optionally resized
    to image_size x image_size with antialiased bilinear filtering."""
    if path.suffix.lower() in _NATIVE_EXTENSIONS:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        if image.dim() == 4:  # animated GIF: keep the first frame
            image = image[0]
    else:
        image = _decode_with_pil(path)
    if image_size is not None and tuple(image.shape[-2:]) != (image_size, image_size):
        resized = F.interpolate(
            image[None].float(), size=(image_size, image_size), mode="bilinear",
            antialias=True, align_corners=False,
        )
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    return image


def _decode_with_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def decode_files(files: Sequence[Path], image_size: int | None, desc: str) -> torch.Tensor:
    """All files as one uint8 [N, 3, H, W] tensor; native sizes must then all agree."""
    with warnings.catch_warnings():
        # torchvision 0.29 flags its decoders as deprecated (moving to torchcodec); they work
        # across the supported torchvision range, and one warning per image is just noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        first = decode_file(files[0], image_size)
        out = torch.empty((len(files), *first.shape), dtype=torch.uint8)
        out[0] = first
        for i, path in enumerate(tqdm(files[1:], desc=desc, unit="img", disable=None), start=1):
            image = decode_file(path, image_size)
            if image.shape != first.shape:
                raise EffrunError(
                    f"images differ in size ({path}: {tuple(image.shape[1:])}, {files[0]}: "
                    f"{tuple(first.shape[1:])}): set dataset.image_size=<int> to resize them"
                )
            out[i] = image
    return out


def read_image_tree(
    root: str | Path,
    splits: Sequence[str],
    *,
    image_size: int | None,
    cache_dir: Path,
    max_per_class: int | None = None,
) -> dict:
    """Decode root/<split>/<class>/* for each split, through the on-disk cache.

    Returns {"classes": [...], "<split>_x": uint8 [N,3,H,W], "<split>_y": int64 [N], ...}.
    Class names and label order come from the first split. `max_per_class` caps the files read
    per class (for quick checks on big trees); it is part of the cache key via the file list.
    """
    root = Path(root).expanduser().resolve()
    listing: dict[str, tuple[list[Path], list[int]]] = {}
    classes: list[str] | None = None
    for split in splits:
        files, labels, classes = scan_split(root / split, classes, max_per_class)
        listing[split] = (files, labels)

    cache_path = Path(cache_dir).expanduser() / (
        f"imagefolder-{root.name}-{_tree_key(root, listing, image_size)}.pt"
    )
    cached = _read_cache(cache_path, splits)
    if cached is not None:
        return cached

    tree: dict = {"classes": classes}
    for split, (files, labels) in listing.items():
        tree[f"{split}_x"] = decode_files(files, image_size, desc=f"decoding {root.name}/{split}")
        tree[f"{split}_y"] = torch.tensor(labels, dtype=torch.int64)
    _write_cache(cache_path, tree)
    return tree


def _tree_key(
    root: Path, listing: dict[str, tuple[list[Path], list[int]]], image_size: int | None
) -> str:
    digest = hashlib.sha256(f"v{_CACHE_FORMAT} size={image_size}\n".encode())
    for split, (files, labels) in listing.items():
        digest.update(f"[{split}]\n".encode())
        for path, label in zip(files, labels, strict=True):
            stat = path.stat()
            rel = path.relative_to(root).as_posix()
            digest.update(f"{rel}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _read_cache(path: Path, splits: Sequence[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        tree = torch.load(path, weights_only=True)
        for split in splits:
            if tree[f"{split}_x"].dtype != torch.uint8 or f"{split}_y" not in tree:
                raise ValueError(f"bad tensors for split {split}")
        tree["classes"] = list(tree["classes"])
        return tree
    except Exception as err:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring unreadable cache file {path}: {err}", stacklevel=3)
        return None


def _write_cache(path: Path, tree: dict) -> None:
    """Atomic (effrun.artifacts.atomic_path); a cache that cannot be written is a warning: the
    decoded data is still good, just not cached."""
    from effrun.artifacts import atomic_path

    try:
        with atomic_path(path) as tmp:
            torch.save(tree, tmp)
    except OSError as err:  # e.g. disk full or a read-only cache dir
        warnings.warn(f"could not write cache file {path}: {err}", stacklevel=3)


def load_tree_splits(root: Path, *, image_size: int | None, cache_dir: Path) -> DataSplits:
    """An ImageFolder tree (train/ plus test/ or val/) as DataSplits, through the decode cache."""
    test_split = find_test_split(root)
    tree = read_image_tree(root, ("train", test_split), image_size=image_size,
                           cache_dir=cache_dir)
    return DataSplits(train_x=tree["train_x"], train_y=tree["train_y"],
                      test_x=tree[f"{test_split}_x"], test_y=tree[f"{test_split}_y"],
                      classes=tree["classes"])
