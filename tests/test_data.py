"""Data layer: synthetic data, val/train carving, batch loading, augmentation, image trees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from effrun.data import (
    Augmentation,
    BatchLoader,
    CIFAR10Data,
    CIFAR100Data,
    DataSplits,
    ImageFolderData,
    SyntheticData,
    image_tree,
)
from effrun.data.splits import channel_stats, finish_splits
from effrun.errors import EffrunError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def small_synthetic(**overrides) -> SyntheticData:
    return SyntheticData(**{"num_train": 200, "num_test": 50, **overrides})


def indexed_splits(n: int = 200, num_classes: int = 4) -> DataSplits:
    """Train images whose first two pixels spell their index, so subsets can be traced back."""
    x = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n) // 256
    x[:, 0, 0, 1] = torch.arange(n) % 256
    y = torch.arange(n) % num_classes
    return DataSplits(x, y, x[:10].clone(), y[:10].clone(), classes=[str(c) for c in range(4)])


def ids(x: torch.Tensor) -> set[int]:
    return set((x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist())


# ---------------------------------------------------------------- synthetic data and splits


def test_synthetic_shapes_and_determinism():
    a = small_synthetic().load(seed=3)
    b = small_synthetic().load(seed=3)
    c = small_synthetic().load(seed=4)
    assert a.train_x.shape == (200, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (50, 3, 32, 32) and a.train_y.dtype == torch.int64
    assert a.train_x.is_contiguous() and a.test_x.is_contiguous()
    assert a.classes == [f"class{i}" for i in range(10)] and a.num_classes == 10
    assert a.image_size == (32, 32) and a.val_x is None
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.bincount(a.train_y).tolist() == [20] * 10
    assert np.allclose(a.mean, a.train_x.float().mean(dim=(0, 2, 3)).div(255).numpy(), atol=1e-5)
    assert np.allclose(a.std, (a.train_x.float() / 255).std(dim=(0, 2, 3)).numpy(), atol=1e-3)


def test_synthetic_test_set_does_not_depend_on_train_size():
    a = small_synthetic(num_train=100).load(0)
    b = small_synthetic(num_train=300).load(0)
    assert torch.equal(a.test_x, b.test_x)


def test_synthetic_image_size_and_classes():
    d = SyntheticData(num_classes=3, num_train=30, num_test=9, image_size=16).load(0)
    assert d.train_x.shape == (30, 3, 16, 16) and d.num_classes == 3


@pytest.mark.parametrize("kwargs,key", [
    ({"val_fraction": 1.5}, "dataset.val_fraction"),
    ({"val_fraction": -0.1}, "dataset.val_fraction"),
    ({"train_fraction": 0.0}, "dataset.train_fraction"),
    ({"noise": -1.0}, "dataset.noise"),
    ({"num_classes": 1}, "dataset.num_classes"),
])
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SyntheticData(**kwargs)


def test_val_and_train_fractions():
    d = small_synthetic(val_fraction=0.2, train_fraction=0.5).load(0)
    assert d.val_x.shape == (40, 3, 32, 32) and d.train_x.shape == (80, 3, 32, 32)
    assert torch.bincount(d.val_y).tolist() == [4] * 10, "val is stratified by class"
    assert torch.bincount(d.train_y).tolist() == [8] * 10
    assert d.test_x.shape[0] == 50, "the test set is never carved"


def test_carving_is_disjoint_deterministic_and_stable():
    full = indexed_splits()
    a = finish_splits(full, val_fraction=0.25, train_fraction=0.5, seed=0)
    b = finish_splits(full, val_fraction=0.25, train_fraction=0.5, seed=0)
    c = finish_splits(full, val_fraction=0.25, train_fraction=1.0, seed=0)
    d = finish_splits(full, val_fraction=0.25, train_fraction=1.0, seed=1)
    assert len(ids(a.val_x)) == 50 and len(ids(a.train_x)) == 75
    assert not ids(a.val_x) & ids(a.train_x)
    assert ids(c.val_x) | ids(c.train_x) == set(range(200)), "nothing lost without a subset"
    assert ids(a.val_x) == ids(b.val_x) and ids(a.train_x) == ids(b.train_x)
    assert ids(a.val_x) == ids(c.val_x), "train_fraction must not change the val split"
    assert ids(c.val_x) != ids(d.val_x), "the seed picks the val split"
    # labels still belong to their images
    assert torch.equal(a.train_y, torch.tensor(sorted(ids(a.train_x))) % 4)


def test_channel_stats_exact():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double() / 255
    assert np.allclose(mean, ref.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(std, ref.std(dim=(0, 2, 3), unbiased=False).numpy())


# ---------------------------------------------------------------- BatchLoader


def id_loader(n=103, batch_size=10, **kwargs) -> BatchLoader:
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    return BatchLoader(x, torch.arange(n), batch_size, mean=(0.5,) * 3, std=(0.25,) * 3,
                       **kwargs)


def epoch_labels(loader: BatchLoader) -> list[int]:
    return torch.cat([labels for _, labels in loader]).tolist()


def test_loader_covers_every_sample_once():
    loader = id_loader(shuffle=True)
    assert len(loader) == 11 and loader.num_samples == 103
    seen = epoch_labels(loader)
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    dropped = id_loader(shuffle=True, drop_last=True)
    assert len(dropped) == 10 and len(epoch_labels(dropped)) == 100
    assert epoch_labels(id_loader()) == list(range(103)), "no shuffle keeps the order"


def test_loader_determinism_per_seed_and_epoch():
    a, b = id_loader(shuffle=True, seed=5), id_loader(shuffle=True, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert epoch_labels(a) == epoch_labels(b)
    a.set_epoch(4)
    b.set_epoch(3)
    assert epoch_labels(a) != epoch_labels(b)
    fresh = id_loader(shuffle=True, seed=5)
    first, second = epoch_labels(fresh), epoch_labels(fresh)
    assert first != second, "passes without set_epoch advance the epoch"
    fresh.set_epoch(0)
    assert epoch_labels(fresh) == first
    assert epoch_labels(id_loader(shuffle=True, seed=6)) != first


def test_loader_augmentation_is_deterministic():
    aug = Augmentation(crop_padding=2, flip=True, cutout=3)
    a = id_loader(shuffle=True, augment=aug, seed=1)
    b = id_loader(shuffle=True, augment=aug, seed=1)
    a.x.copy_(b.x)
    for loader in (a, b):
        loader.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_loader_normalizes_and_formats():
    x = torch.full((4, 3, 5, 5), 200, dtype=torch.uint8)
    x[:, 1] = 50
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.25, 0.1)
    loader = BatchLoader(x, torch.zeros(4, dtype=torch.long), 4, mean=mean, std=std)
    inputs, _ = next(iter(loader))
    assert inputs.dtype == torch.float32 and inputs.shape == (4, 3, 5, 5)
    for c, value in enumerate((200, 50, 200)):
        expected = (value / 255 - mean[c]) / std[c]
        assert torch.allclose(inputs[:, c], torch.tensor(expected), atol=1e-5)
    half = BatchLoader(x, torch.zeros(4, dtype=torch.long), 4, mean=mean, std=std,
                       dtype=torch.bfloat16, channels_last=True)
    inputs, labels = next(iter(half))
    assert inputs.dtype == torch.bfloat16 and labels.dtype == torch.int64
    assert inputs.is_contiguous(memory_format=torch.channels_last)


def test_loader_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(torch.zeros(2, 3, 4, 4), torch.zeros(2), 1, mean=(0,) * 3, std=(1,) * 3)


# ---------------------------------------------------------------- Augmentation


def batch(n=32, size=16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_augmentation_keeps_shape_and_default_is_off():
    x = batch()
    assert not Augmentation().enabled
    assert torch.equal(Augmentation()(x, torch.Generator()), x)
    out = Augmentation(crop_padding=4, flip=True, cutout=8)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_flip_flips_some_samples():
    x = batch()
    out = Augmentation(flip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < len(x)


def test_crop_shifts_content_within_padding():
    x, pad = batch(), 2
    out = Augmentation(crop_padding=pad)(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    offsets = []
    for o, p in zip(out, padded, strict=True):
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(o, p[:, dy : dy + 16, dx : dx + 16])]
        assert match, "every output is a window of the reflect-padded input"
        offsets.append(match[0])
    assert len(set(offsets)) > 5 and any(off != (pad, pad) for off in offsets)


def test_cutout_zeros_a_square():
    x = batch().abs() + 1.0  # no zeros before cutout
    out = Augmentation(cutout=6)(x, torch.Generator().manual_seed(0))
    full_squares = 0
    for o in out:
        zero = o == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        rows, cols = zero[0].any(dim=1).nonzero(), zero[0].any(dim=0).nonzero()
        height, width = len(rows), len(cols)
        assert 1 <= height <= 6 and 1 <= width <= 6
        assert int(zero[0].sum()) == height * width, "the zeroed area is one rectangle"
        full_squares += height == width == 6
    assert full_squares > 0


def test_augmentation_rejects_bad_values():
    with pytest.raises(ValueError, match="augmentation.crop_padding"):
        Augmentation(crop_padding=-1)
    with pytest.raises(EffrunError, match="augmentation.crop_padding"):
        Augmentation(crop_padding=16)(batch(), torch.Generator())


# ---------------------------------------------------------------- image folder trees


def save_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)


def write_tree(root: Path, test_split: str = "test", size: int = 8) -> None:
    """Two classes; PNG, JPEG, grey, RGBA and palette images; train/ and a held-out split."""
    rng = np.random.default_rng(0)

    def rgb() -> np.ndarray:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    save_image(root / "train/cat/a.png", rgb())
    save_image(root / "train/cat/b.jpg", rgb())
    save_image(root / "train/cat/grey.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    save_image(root / "train/dog/a.png", rgb(), mode="RGBA")
    save_image(root / "train/dog/b.png", rgb(), mode="P")
    (root / "train/dog/notes.txt").write_text("not an image")
    save_image(root / f"{test_split}/cat/c.png", rgb())
    save_image(root / f"{test_split}/dog/d.jpeg", rgb())


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_imagefolder_loads_and_caches(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write_tree(root)
    before = listing(root)
    d = ImageFolderData(root=str(root), cache_dir=str(cache)).load(0)
    assert d.classes == ["cat", "dog"]
    assert d.train_x.shape == (5, 3, 8, 8) and d.train_x.dtype == torch.uint8
    assert d.train_y.tolist() == [0, 0, 0, 1, 1] and d.test_y.tolist() == [0, 1]
    assert torch.equal(d.train_x[0], torch.from_numpy(np.array(
        Image.open(root / "train/cat/a.png"))).permute(2, 0, 1)), "PNG decodes losslessly"
    grey = d.train_x[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])
    cache_files = list(cache.glob("*.pt"))
    assert len(cache_files) == 1
    assert listing(root) == before, "nothing is written inside the data dir"

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(image_tree, "decode_file", no_decoding)
    again = ImageFolderData(root=str(root), cache_dir=str(cache)).load(0)
    assert torch.equal(again.train_x, d.train_x) and again.classes == d.classes
    monkeypatch.undo()

    # A changed tree or other preprocessing misses the cache and gets its own file.
    save_image(root / "train/dog/c.png", np.zeros((8, 8, 3), dtype=np.uint8))
    grown = ImageFolderData(root=str(root), cache_dir=str(cache)).load(0)
    assert grown.train_x.shape[0] == 6
    resized = ImageFolderData(root=str(root), cache_dir=str(cache), image_size=4).load(0)
    assert resized.image_size == (4, 4)
    assert len(list(cache.glob("*.pt"))) == 3
    assert not list(cache.glob("*.tmp")), "no temp files left behind"


def test_imagefolder_default_cache_dir_from_env(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    write_tree(root)
    monkeypatch.setenv("EFFRUN_CACHE_DIR", str(tmp_path / "envcache"))
    ImageFolderData(root=str(root)).load(0)
    assert len(list((tmp_path / "envcache").glob("*.pt"))) == 1


def test_imagefolder_val_fallback_and_fractions(tmp_path):
    root = tmp_path / "tree"
    write_tree(root, test_split="val")
    d = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "c"), val_fraction=0.4).load(0)
    assert d.test_x.shape == (2, 3, 8, 8)
    assert d.val_x.shape[0] == 2 and d.train_x.shape[0] == 3


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    root = tmp_path / "tree"
    write_tree(root)
    save_image(root / "train/cat/big.png", np.zeros((12, 10, 3), dtype=np.uint8))
    with pytest.raises(EffrunError, match="dataset.image_size"):
        ImageFolderData(root=str(root), cache_dir=str(tmp_path / "c")).load(0)
    d = ImageFolderData(root=str(root), cache_dir=str(tmp_path / "c"), image_size=6).load(0)
    assert d.train_x.shape == (6, 3, 6, 6) and d.test_x.shape == (2, 3, 6, 6)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(EffrunError, match="dataset.root="):
        ImageFolderData(root=str(tmp_path / "nope")).load(0)
    with pytest.raises(EffrunError, match="dataset.root"):
        ImageFolderData().load(0)


def test_folder_reader_caps_per_class(tmp_path):
    root = tmp_path / "tree"
    write_tree(root)
    tree = image_tree.read_image_tree(root, ("train", "test"), image_size=None,
                                  cache_dir=tmp_path / "c", max_per_class=1)
    assert tree["train_y"].tolist() == [0, 1] and tree["test_x"].shape == (2, 3, 8, 8)


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("cls,name", [(CIFAR10Data, "CIFAR-10"), (CIFAR100Data, "CIFAR-100")])
def test_cifar_missing_data_says_what_to_set(tmp_path, cls, name):
    with pytest.raises(EffrunError) as err:
        cls(root=str(tmp_path / "none")).load(0)
    message = str(err.value)
    assert name in message and "dataset.root=" in message and "dataset.download=true" in message
    assert "\n" not in message


def test_cifar_from_imagefolder_tree(tmp_path):
    root = tmp_path / "cifar"
    write_tree(root, size=32)
    save_image(root / "train/dog/small.png", np.zeros((16, 16, 3), dtype=np.uint8))
    d = CIFAR10Data(root=str(root), cache_dir=str(tmp_path / "c"), val_fraction=0.5).load(0)
    assert d.classes == ["cat", "dog"] and d.image_size == (32, 32)
    assert d.train_x.shape[0] + d.val_x.shape[0] == 6 and d.test_x.shape == (2, 3, 32, 32)


def test_cifar_from_torchvision_layout(tmp_path, monkeypatch):
    """The pickled layout goes through torchvision; its numpy NHWC arrays become NCHW tensors."""
    rng = np.random.default_rng(0)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert Path(root) == tmp_path and download is False
            n = 6 if train else 4
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            self.classes = CIFAR10_CLASSES

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    d = CIFAR10Data(root=str(tmp_path)).load(0)
    assert d.train_x.shape == (6, 3, 32, 32) and d.train_x.is_contiguous()
    assert d.test_y.tolist() == [0, 1, 2, 3] and d.classes == CIFAR10_CLASSES


def test_real_cifar10_jpeg_subset(tmp_path):
    """Set EFFRUN_CIFAR10_JPEG=<dir with train/ test/> to read a slice of the real tree."""
    root = os.environ.get("EFFRUN_CIFAR10_JPEG")
    if not root:
        pytest.skip("EFFRUN_CIFAR10_JPEG not set")
    assert Path(root, "train").is_dir(), f"EFFRUN_CIFAR10_JPEG={root} has no train/ folder"
    tree = image_tree.read_image_tree(root, ("train", "test"), image_size=32,
                                  cache_dir=tmp_path, max_per_class=20)
    assert tree["classes"] == CIFAR10_CLASSES
    assert tree["train_x"].shape == (200, 3, 32, 32) and tree["test_x"].shape == (200, 3, 32, 32)
    assert torch.bincount(tree["train_y"]).tolist() == [20] * 10
    mean, std = channel_stats(tree["train_x"])
    assert all(0.3 < m < 0.65 for m in mean) and all(0.15 < s < 0.35 for s in std)
