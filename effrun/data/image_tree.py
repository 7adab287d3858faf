"""Read an ImageFolder tree (root/<split>/<class>/<image>) into uint8 tensors, cached on disk.

Decoding tens of thousands of small files is the slow part, so each tree is decoded once and
saved as a single .pt file in the cache dir (never beside the data, which may be read-only).
The cache key covers every file's relative path, size and mtime, plus the preprocessing, so
any change to the tree or to image_size decodes afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from effrun.data.splits import DataSplits
from effrun.errors import EffrunError

# Bump when decoding or resizing changes, so old cache files stop matching.
_CACHE_FORMAT = 1
# decode_image handles these natively; the rest go through PIL.
_NATIVE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
_PIL_EXTENSIONS = {".bmp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGE_EXTENSIONS = _NATIVE_EXTENSIONS | _PIL_EXTENSIONS
# torchvision's decoder errors start with "<function>, <source file>:<line>, ".
_TORCHVISION_PREFIX = re.compile(r"^\w+, \S+:\d+, ")
# Held-out images with center_crop=c: the shorter side resized to c / 0.875, then the central
# c x c (224 from 256, the ImageNet evaluation convention).
EVAL_CROP_FRACTION = 0.875

log = logging.getLogger("effrun")


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


def decode_file(path: Path, image_size: int | None = None,
                center_crop: int | None = None) -> torch.Tensor:
    """One image as uint8 [3, H, W] RGB (grey, alpha and palettes converted), optionally resized
    to image_size x image_size with antialiased bilinear filtering, then optionally center-cropped
    to center_crop x center_crop after resizing its shorter side (EVAL_CROP_FRACTION)."""
    if path.suffix.lower() in _NATIVE_EXTENSIONS:
        # imported where used: torchvision takes seconds to import (its ops import torch._dynamo)
        from torchvision.io import ImageReadMode, decode_image, read_file

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
    if center_crop is not None:
        image = _resize_then_center_crop(image, center_crop)
    return image


def _resize_then_center_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    short_side = max(crop, round(crop / EVAL_CROP_FRACTION))
    image = TF.resize(image, [short_side], antialias=True)  # an int: the shorter side
    return TF.center_crop(image, [crop, crop])


def _decode_with_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        rgb = img.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def decode_files(files: Sequence[Path], image_size: int | None, desc: str,
                 skip_bad: bool = False, center_crop: int | None = None
                 ) -> tuple[torch.Tensor, list[int]]:
    """All files as one uint8 [N, 3, H, W] tensor; native sizes must then all agree.

    A file that does not decode (truncated, empty, not an image) is an EffrunError naming it;
    with `skip_bad` it is left out instead. Returns (images, indices of the files left out)."""
    with warnings.catch_warnings():
        # torchvision 0.29 flags its decoders as deprecated (moving to torchcodec); they work
        # across the supported torchvision range, and one warning per image is just noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        out: torch.Tensor | None = None
        first: Path | None = None
        bad: list[int] = []
        for i, path in enumerate(tqdm(files, desc=desc, unit="img", disable=None)):
            try:
                image = decode_file(path, image_size, center_crop)
            except Exception as err:  # torchvision's RuntimeError, PIL's OSError, ...
                if not skip_bad:
                    raise EffrunError(f"cannot decode image {path}: {decode_error(err)} (set "
                                      f"dataset.skip_bad_images=true to skip such files)"
                                      ) from None
                bad.append(i)
                continue
            if out is None:
                out = torch.empty((len(files), *image.shape), dtype=torch.uint8)
                first = path
            elif image.shape != out.shape[1:]:
                raise EffrunError(
                    f"images differ in size ({path}: {tuple(image.shape[1:])}, {first}: "
                    f"{tuple(out.shape[2:])}): set dataset.image_size=<int> to resize them"
                )
            out[i] = image
    if out is None:
        raise EffrunError(f"no image under {Path(files[0]).parent.parent} could be decoded "
                          f"(first: {files[0]})")
    if bad:
        keep = torch.ones(len(files), dtype=torch.bool)
        keep[bad] = False
        out = out[keep]
    return out, bad


def decode_error(err: Exception) -> str:
    """A decoder's error as a short phrase (no source locations, first sentence only)."""
    lines = str(err).strip().splitlines()
    text = _TORCHVISION_PREFIX.sub("", lines[0]) if lines else ""
    text = text.split(". ")[0].rstrip(".")
    return text or type(err).__name__


def read_image_tree(
    root: str | Path,
    splits: Sequence[str],
    *,
    image_size: int | None,
    cache_dir: Path,
    max_per_class: int | None = None,
    skip_bad: bool = False,
) -> dict:
    """Decode root/<split>/<class>/* for each split, through the on-disk cache.

    Returns {"classes": [...], "<split>_x": uint8 [N,3,H,W], "<split>_y": int64 [N], ...}.
    Class names and label order come from the first split. `max_per_class` caps the files read
    per class (for quick checks on big trees); it is part of the cache key via the file list.
    A file that does not decode is an EffrunError naming it; `skip_bad` leaves such files out
    with one warning that lists them (the cache remembers them, so a cached load warns too).
    """
    root = Path(root).expanduser().resolve()
    listing: dict[str, tuple[list[Path], list[int]]] = {}
    classes: list[str] | None = None
    for split in splits:
        files, labels, classes = scan_split(root / split, classes, max_per_class)
        listing[split] = (files, labels)
    warn_about_classes(root, listing, classes)
    return decode_listing(root, listing, classes, image_size=image_size, cache_dir=cache_dir,
                          skip_bad=skip_bad)


def decode_listing(root: Path, listing: dict[str, tuple[list[Path], list[int]]],
                   classes: list[str], *, image_size: int | None, cache_dir: Path,
                   skip_bad: bool = False, center_crop: int | None = None) -> dict:
    """Decode the files of each named part of `listing` ({name: (files, labels)}, files under
    root) through the on-disk cache; returns {"classes", "<name>_x", "<name>_y", ...} as
    read_image_tree does. The cache is read memory-mapped: processes reading the same file
    (the ranks of a node) share one copy in the page cache."""
    preprocess = f"size={image_size}" + (f" center_crop={center_crop}" if center_crop else "")
    cache_path = Path(cache_dir).expanduser() / (
        f"imagefolder-{root.name}-{_tree_key(root, listing, preprocess)}.pt"
    )
    cached = _read_cache(cache_path, list(listing))
    if cached is not None:
        cached_skipped = list(cached.pop("skipped", []))
        if cached_skipped and not skip_bad:
            raise EffrunError(f"cannot decode image {root / cached_skipped[0]} (set "
                              f"dataset.skip_bad_images=true to skip such files)")
        _warn_skipped(root, cached_skipped)
        return cached

    tree: dict = {"classes": classes}
    skipped: list[str] = []
    for split, (files, labels) in listing.items():
        images, bad = decode_files(files, image_size, desc=f"decoding {root.name}/{split}",
                                   skip_bad=skip_bad, center_crop=center_crop)
        bad_set = set(bad)
        tree[f"{split}_x"] = images
        tree[f"{split}_y"] = torch.tensor(
            [label for i, label in enumerate(labels) if i not in bad_set], dtype=torch.int64)
        skipped += [files[i].relative_to(root).as_posix() for i in bad]
    _warn_skipped(root, skipped)
    _write_cache(cache_path, {**tree, "skipped": skipped})
    return tree


def _warn_skipped(root: Path, skipped: list[str]) -> None:
    if skipped:
        log.warning("skipped %d image file(s) under %s that do not decode "
                    "(dataset.skip_bad_images=true): %s", len(skipped), root, ", ".join(skipped))


def warn_about_classes(root: Path, listing: dict[str, tuple[list[Path], list[int]]],
                        classes: list[str]) -> None:
    """Warnings (the run goes on) for trees a model can learn little from."""
    if len(classes) == 1:
        log.warning("%s has a single class (%s): accuracy is trivially 100%%",
                    root / next(iter(listing)), classes[0])
    for split, (_files, labels) in listing.items():
        present = set(labels)
        empty = [c for i, c in enumerate(classes) if i not in present]
        if empty:
            log.warning("%s has no images of class(es) %s", root / split, ", ".join(empty))


def _tree_key(
    root: Path, listing: dict[str, tuple[list[Path], list[int]]], preprocess: str
) -> str:
    digest = hashlib.sha256(f"v{_CACHE_FORMAT} {preprocess}\n".encode())
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
        tree = torch.load(path, weights_only=True, mmap=True)
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
    except (OSError, EffrunError) as err:  # e.g. disk full or a read-only cache dir
        warnings.warn(f"could not write cache file {path}: {err}", stacklevel=3)


def load_tree_splits(root: Path, *, image_size: int | None, cache_dir: Path,
                     skip_bad: bool = False) -> DataSplits:
    """An ImageFolder tree (train/ plus test/ or val/) as DataSplits, through the decode cache."""
    test_split = find_test_split(root)
    tree = read_image_tree(root, ("train", test_split), image_size=image_size,
                           cache_dir=cache_dir, skip_bad=skip_bad)
    return DataSplits(train_x=tree["train_x"], train_y=tree["train_y"],
                      test_x=tree[f"{test_split}_x"], test_y=tree[f"{test_split}_y"],
                      classes=tree["classes"])
