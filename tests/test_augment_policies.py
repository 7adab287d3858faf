"""Augmentation options: op policies per sample, mixup/CutMix soft labels, bad inputs.

Every option in configs/augmentation is enumerated, so a new one is tested without edits here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from conftest import compose_cfg, options, write_image_tree
from torch import nn
from torchvision.transforms import InterpolationMode

from effrun.compression.distill.kd import kd_loss
from effrun.data import Augmentation, BatchLoader, ImageFolderData, SyntheticData, policies
from effrun.data.mix import dominant_labels, mix_batch
from effrun.errors import ConfigError, EffrunError
from effrun.hardware import Hardware
from effrun.keys import stage_config
from effrun.measure import set_threads
from effrun.optim import SGD
from effrun.schema import TrainConfig, build_node, load_option, validate
from effrun.train import fit

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread():
    # Batches of a few 16-px images: a second thread only adds hand-offs (slow on a busy box).
    with set_threads(1):
        yield


def option(name: str) -> Augmentation:
    return build_node(load_option("augmentation", name), f"augmentation={name}")


def images(n: int = 32, size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


def loader(aug: Augmentation, x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> BatchLoader:
    return BatchLoader(x, y, 16, mean=(0.5,) * 3, std=(0.25,) * 3, shuffle=True, augment=aug,
                       seed=seed, num_classes=NUM_CLASSES)


def distinct(batch: torch.Tensor) -> int:
    """How many different images a batch holds."""
    return len(torch.unique(batch.flatten(1), dim=0))


# -- every option ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", options("augmentation"))
def test_option_keeps_shapes_dtypes_and_labels(name):
    aug = option(name)
    x, y = images(), torch.arange(32) % NUM_CLASSES
    batches = list(loader(aug, x, y))
    # The same seed without augmentation: the same order (drawn first), so the same labels.
    plain = [labels for _, labels in loader(Augmentation(), x, y)]
    assert len(batches) == 2
    for (inputs, labels), hard in zip(batches, plain, strict=True):
        assert inputs.shape == (16, 3, 16, 16) and inputs.dtype == torch.float32
        assert torch.isfinite(inputs).all()
        if aug.mix == "none":
            assert labels.dtype == torch.int64 and torch.equal(labels, hard)
            continue
        # Soft labels: a distribution per sample, on its own class and the batch's classes.
        assert labels.shape == (16, NUM_CLASSES) and labels.dtype == torch.float32
        assert torch.allclose(labels.sum(1), torch.ones(16)) and (labels >= 0).all()
        assert (labels[torch.arange(16), hard] > 0).all()
        outside = torch.ones(NUM_CLASSES, dtype=torch.bool)
        outside[hard] = False
        assert (labels[:, outside] == 0).all()


@pytest.mark.parametrize("name", options("augmentation"))
def test_option_is_deterministic_from_seed_and_epoch(name):
    aug = option(name)
    x, y = images(), torch.arange(32) % NUM_CLASSES
    first, again, other = loader(aug, x, y), loader(aug, x, y), loader(aug, x, y, seed=1)
    a, b, c = next(iter(first)), next(iter(again)), next(iter(other))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if aug.enabled:
        assert not torch.equal(a[0], c[0]), "another seed draws another batch"
        again.set_epoch(1)
        assert not torch.equal(a[0], next(iter(again))[0]), "another epoch too"


@pytest.mark.parametrize("name", options("augmentation"))
def test_short_fit_runs_with_option(tmp_path, name):
    data = SyntheticData(num_train=64, num_test=16, image_size=16).load(seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))
    result = fit(net, data, hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                 train=TrainConfig(epochs=1, batch_size=32, eval_every=0, label_smoothing=0.1),
                 optimizer=SGD(lr=0.05), augment=option(name), checkpoint=tmp_path / "c.pt",
                 seed=0)
    record = result["history"][0]
    assert math.isfinite(record["train_loss"]) and 0 <= record["train_accuracy"] <= 1


# -- policies: per sample, torchvision's ops ----------------------------------------------------

POLICY_CASES = {
    "randaugment": (lambda b, g: policies.randaugment(b, g, num_ops=2, magnitude=9),
                    T.RandAugment()),
    "trivialaugment": (policies.trivialaugment, T.TrivialAugmentWide()),
    "autoaugment": (lambda b, g: policies.autoaugment(b, g, policy="cifar10"),
                    T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)),
}


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_policy_draws_per_sample_where_a_v2_transform_draws_per_batch(policy):
    ours, torchvision_transform = POLICY_CASES[policy]
    same = images(1, 32).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = ours(same, torch.Generator().manual_seed(0))
    assert out.shape == same.shape and out.dtype == torch.uint8
    assert distinct(out) > 10, "each sample draws its own op and magnitude"
    torch.manual_seed(0)
    assert distinct(torchvision_transform(same)) == 1, "v2 on a batch: one draw for all"


@pytest.mark.parametrize("policy", sorted(POLICY_CASES))
def test_policy_is_deterministic_from_the_generator(policy):
    ours, _ = POLICY_CASES[policy]
    batch = images(16, 32)
    a = ours(batch, torch.Generator().manual_seed(3))
    assert torch.equal(a, ours(batch, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, ours(batch, torch.Generator().manual_seed(4)))


def torchvision_op(op: str, image: torch.Tensor, m: float) -> torch.Tensor:
    """What torchvision's _AutoAugmentBase does for `op` at magnitude m (nearest, fill 0)."""
    nearest = InterpolationMode.NEAREST
    shear = math.degrees(math.atan(m))
    calls = {
        "ShearX": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[shear, 0.0], interpolation=nearest, center=[0, 0]),
        "ShearY": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0,
                                    shear=[0.0, shear], interpolation=nearest, center=[0, 0]),
        "TranslateX": lambda: TF.affine(image, angle=0.0, translate=[int(m), 0], scale=1.0,
                                        shear=[0.0, 0.0], interpolation=nearest),
        "TranslateY": lambda: TF.affine(image, angle=0.0, translate=[0, int(m)], scale=1.0,
                                        shear=[0.0, 0.0], interpolation=nearest),
        "Rotate": lambda: TF.rotate(image, m, interpolation=nearest),
        "Brightness": lambda: TF.adjust_brightness(image, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(image, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(image, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(image, 1.0 + m),
        "Posterize": lambda: TF.posterize(image, int(m)),
        "Solarize": lambda: TF.solarize(image, m),
        "AutoContrast": lambda: TF.autocontrast(image),
        "Equalize": lambda: TF.equalize(image),
        "Invert": lambda: TF.invert(image),
    }
    return calls[op]()


OP_MAGNITUDES = {"ShearX": [0.3, -0.99], "ShearY": [0.21, -0.5], "TranslateX": [7.9, -14.0],
                 "TranslateY": [5.5, -32.0], "Rotate": [30.0, -135.0, 90.0, 12.3],
                 "Brightness": [0.9, -0.5], "Color": [0.9, -0.99], "Contrast": [0.5, -0.9],
                 "Sharpness": [0.9, -0.9], "Posterize": [8.0, 4.0, 2.0],
                 "Solarize": [255.0, 128.0, 8.5], "AutoContrast": [0.0], "Equalize": [0.0],
                 "Invert": [0.0]}


@pytest.mark.parametrize("op", sorted(OP_MAGNITUDES))
def test_batched_op_matches_torchvision_per_image(op):
    # Not square: catches a swapped height and width.
    batch = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    for m in OP_MAGNITUDES[op]:
        ours = policies.apply_ops(batch, torch.full((4,), policies.OPS.index(op)),
                                  torch.full((4,), m))
        assert torch.equal(ours, torchvision_op(op, batch, m)), (op, m)
    # A magnitude per sample: each image as torchvision gives it alone at its own magnitude.
    mags = OP_MAGNITUDES[op] * 4
    ours = policies.apply_ops(batch, torch.full((4,), policies.OPS.index(op)),
                              torch.tensor(mags[:4]))
    for i in range(4):
        assert torch.equal(ours[i], torchvision_op(op, batch[i : i + 1], mags[i])[0]), (op, i)


def test_autoaugment_policy_follows_image_size(caplog):
    policies.check_policy_data("autoaugment", "imagenet", 32, 32, 3)
    assert "autoaugment_policy=imagenet fits 112 px and up images" in caplog.text
    assert policies.resolve_autoaugment_policy("auto", 32, 32) == "cifar10"
    assert policies.resolve_autoaugment_policy("auto", 224, 224) == "imagenet"
    assert policies.resolve_autoaugment_policy("svhn", 32, 32) == "svhn"
    with pytest.raises(EffrunError, match="no AutoAugment policy for 96x96") as info:
        policies.resolve_autoaugment_policy("auto", 96, 96)
    assert "\n" not in str(info.value)


# -- mixup / CutMix -------------------------------------------------------------------------

def one_per_class(n: int = 8, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i (so a pixel tells which sample it came from); label i."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size)
    return x.contiguous(), torch.arange(n)


def mixed(mix: str, seed: int, prob: float = 1.0):
    x, y = one_per_class()
    out, soft = mix_batch(x, y, mix=mix, alpha=1.0, prob=prob, num_classes=8,
                          generator=torch.Generator().manual_seed(seed),
                          host_rng=np.random.default_rng(seed))
    return x, y, out, soft


def drawn(seed: int) -> tuple[float, torch.Tensor]:
    """The lambda and partners mix_batch draws with these generators (prob check, then Beta)."""
    host = np.random.default_rng(seed)
    host.random()
    return float(host.beta(1.0, 1.0)), torch.randperm(8, generator=torch.Generator().manual_seed(
        seed))


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_pixels_and_labels_by_the_same_lambda(seed):
    x, y, out, soft = mixed("mixup", seed)
    lam, partner = drawn(seed)
    assert torch.allclose(out, lam * x + (1 - lam) * x[partner], atol=1e-5)
    eye = torch.eye(8)
    assert torch.allclose(soft, lam * eye + (1 - lam) * eye[partner], atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(8))


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_labels_match_the_pasted_area(seed):
    x, y, out, soft = mixed("cutmix", seed)
    _, partner = drawn(seed)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert (soft.diagonal() < 1).any(), "some sample got a box pasted in"
    for i in range(8):
        assert set(out[i].unique().tolist()) <= {float(i), float(partner[i])}
        own_share = float((out[i] == i).float().mean())
        assert float(soft[i, i]) == pytest.approx(own_share, abs=1e-6)


def test_unmixed_batch_has_one_hot_labels_and_dominant_label_is_the_class():
    x, y, out, soft = mixed("mixup", 0, prob=1e-9)
    assert torch.equal(out, x) and torch.equal(soft, torch.eye(8))
    assert torch.equal(dominant_labels(soft), y) and torch.equal(dominant_labels(y), y)


def test_distillation_loss_takes_soft_labels():
    student, teacher = torch.randn(8, 8), torch.randn(8, 8)
    _, y, _, soft = mixed("mixup", 0, prob=1e-9)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    hard = kd_loss(student, teacher, y, temperature=4.0, alpha=0.5, ce=ce)
    assert torch.allclose(kd_loss(student, teacher, soft, temperature=4.0, alpha=0.5, ce=ce),
                          hard)


# -- bad input: one line each ---------------------------------------------------------------

@pytest.mark.parametrize("override", ["policy=randaug", "mix=mixupp", "mix_alpha=0",
                                      "mix_prob=0", "randaugment_magnitude=31",
                                      "randaugment_ops=0", "autoaugment_policy=cifar100"])
def test_bad_values_are_one_line_config_errors(override):
    key, value = override.split("=")
    node = load_option("augmentation", "standard")
    node[key] = type(node[key])(value) if not isinstance(node[key], str) else value
    with pytest.raises(ConfigError, match=f"augmentation.{key}") as info:
        build_node(node, "augmentation")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("aug, x, y, message", [
    (Augmentation(policy="trivialaugment"), images(4, 8), torch.arange(4),
     "at least 16x16 px"),
    (Augmentation(policy="autoaugment"), images(2, 96), torch.arange(2),
     "no AutoAugment policy for 96x96"),
    (Augmentation(policy="randaugment"), images(2, 16)[:, :2], torch.arange(2),
     "1- or 3-channel"),
    (Augmentation(mix="cutmix"), images(4), torch.zeros(4, dtype=torch.long),
     "at least 2 classes"),
    (Augmentation(crop_padding=8), images(2, 8), torch.arange(2), "smaller than the image"),
])
def test_augmentation_the_data_cannot_take_is_one_line(aug, x, y, message):
    with pytest.raises(EffrunError, match=message) as info:
        BatchLoader(x, y, 2, mean=(0.5,) * x.shape[1], std=(0.5,) * x.shape[1], augment=aug)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("aug", [Augmentation(policy="trivialaugment"), Augmentation(mix="mixup")])
def test_streamed_data_trains_with_policies_and_mixes(tmp_path, aug):
    """The streaming loader runs the same batch-level policy and mix code as the memory one."""
    root = write_image_tree(tmp_path / "tree", classes=2, per_class=4, test_per_class=2, size=16)
    data = ImageFolderData(root=str(root), loader="stream", workers=0,
                           cache_dir=str(tmp_path / "cache")).load(seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    result = fit(model, data, hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                 train=TrainConfig(epochs=1, batch_size=4), optimizer=SGD(lr=0.05), augment=aug,
                 checkpoint=tmp_path / "c.pt", seed=0)
    assert len(result["history"]) == 1 and 0 <= result["test_accuracy"] <= 1


def test_stage_keys_hold_policy_and_mix_keys_only_when_set():
    def train_key(*overrides: str) -> dict:
        config = validate(compose_cfg(["+experiment=smoke", *overrides]))
        return stage_config(config, "train")["augmentation"]

    # As before the keys existed, so finished stages and the stage cache still match.
    assert set(train_key()) == {"_target_", "crop_padding", "flip", "alternate_flip", "cutout"}
    mixed_key = train_key("augmentation=mixup", "augmentation.mix_alpha=0.2")
    assert mixed_key["mix"] == "mixup" and mixed_key["mix_alpha"] == 0.2
    assert "mix_prob" not in mixed_key, "left at its default"


@pytest.mark.slow
@pytest.mark.parametrize("name", options("augmentation"))
def test_every_option_still_learns_synthetic_data(tmp_path, name):
    """8 epochs of a 2-conv net on 1,024 16-px images: measured 0.67 (trivialaugment) to 0.94
    (none) test top-1; chance is 0.1. Labels out of step with the images would not learn."""
    data = SyntheticData(num_train=1024, num_test=500, image_size=16, confusion=0.0).load(seed=0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, NUM_CLASSES))
    result = fit(net, data, hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                 train=TrainConfig(epochs=8, batch_size=64, eval_every=0),
                 optimizer=SGD(lr=0.1, schedule="onecycle"), augment=option(name),
                 checkpoint=tmp_path / "c.pt", seed=0)
    assert result["test_accuracy"] > 0.5
