"""AutoAugment, RandAugment and TrivialAugment (Wide) with a random choice per sample, batched.

torchvision.transforms.v2's policy classes draw one op (and one magnitude) per call: called on a
batched tensor, every image in the batch gets the same op, which is not the policy. Here each
sample draws its own op, magnitude bin and sign from the loader's generator; the batch is then
grouped by op and each op runs once on its sub-batch, with a magnitude per sample (one kernel
call per op, not per image). The ops, magnitude tables and uint8 arithmetic follow
torchvision.transforms.v2 (nearest interpolation, fill 0), so a sample gets what torchvision's
transform would give that one image for the same draw (tests/test_augment_policies.py compares).

All ops work on uint8 NCHW images (posterize, solarize and equalize are defined on 0..255), so
the loader runs a policy before it normalizes.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from effrun.errors import EffrunError

log = logging.getLogger(__name__)

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")
AUTOAUGMENT_POLICIES = ("auto", "cifar10", "svhn", "imagenet")
# Every op any policy uses; a sample's op is an index into this tuple.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
       "Invert")
# RandAugment and TrivialAugment draw uniformly from these (torchvision's spaces: no Invert).
RANDOM_OPS = OPS[:-1]
NUM_BINS = 31  # RandAugment's and TrivialAugment's magnitude bins (torchvision's default)
AUTOAUGMENT_BINS = 10
# Image sides (px) each AutoAugment policy fits: within a factor 2 of the size it was learned
# at (CIFAR-10 and SVHN 32 px, ImageNet 224 px; larger ImageNet-like images take it too).
POLICY_SIDES = {"cifar10": (16, 64), "svhn": (16, 64), "imagenet": (112, math.inf)}
# The policies were tuned on images of 32 px and up; below half that effrun refuses them rather
# than guess: TrivialAugment's shifts (up to 32 px) exceed the whole image, and nearest-neighbour
# shears and rotations leave little of a few pixels.
MIN_POLICY_SIDE = 16


def check_policy_data(policy: str, autoaugment_policy: str, height: int, width: int,
                      channels: int) -> None:
    """One-line EffrunError when `policy` cannot run on images of this size and channel count
    (a warning for an AutoAugment policy chosen for another image size)."""
    if policy == "none":
        return
    if channels not in (1, 3):
        raise EffrunError(f"augmentation.policy={policy} needs 1- or 3-channel images, "
                          f"the data has {channels} channels")
    if min(height, width) < MIN_POLICY_SIDE:
        raise EffrunError(f"augmentation.policy={policy} needs images of at least "
                          f"{MIN_POLICY_SIDE}x{MIN_POLICY_SIDE} px (its magnitudes are tuned for "
                          f"32 px and up), the data has {height}x{width}; use crop/flip instead")
    if policy != "autoaugment":
        return
    name = resolve_autoaugment_policy(autoaugment_policy, height, width)
    low, high = POLICY_SIDES[name]
    if not low <= max(height, width) <= high:
        log.warning("augmentation.autoaugment_policy=%s fits %s images, the data has %dx%d",
                    name, _fit_text(name), height, width)


def resolve_autoaugment_policy(name: str, height: int, width: int) -> str:
    """`auto` -> the learned policy that fits the data's image size (cifar10 or imagenet)."""
    if name != "auto":
        return name
    for candidate in ("cifar10", "imagenet"):
        low, high = POLICY_SIDES[candidate]
        if low <= max(height, width) <= high:
            return candidate
    raise EffrunError(f"augmentation.autoaugment_policy=auto knows no AutoAugment policy for "
                      f"{height}x{width} images (cifar10 fits {_fit_text('cifar10')}, imagenet "
                      f"{_fit_text('imagenet')}); set it to cifar10, svhn or imagenet")


def _fit_text(name: str) -> str:
    low, high = POLICY_SIDES[name]
    return f"{low}-{high} px" if high < math.inf else f"{low} px and up"


def randaugment(images: torch.Tensor, generator: torch.Generator, *, num_ops: int,
                magnitude: int) -> torch.Tensor:
    """RandAugment: `num_ops` ops in a row, each drawn uniformly per sample, all at bin
    `magnitude` of NUM_BINS, with a random sign per sample and op."""
    n, device = images.shape[0], images.device
    table, signed = _magnitudes(wide=False, bins=NUM_BINS, size=tuple(images.shape[-2:]),
                                device=device)
    candidates = torch.tensor([OPS.index(op) for op in RANDOM_OPS], device=device)
    for _ in range(num_ops):
        ops = candidates[torch.randint(len(candidates), (n,), generator=generator,
                                       device=device)]
        bins = torch.full((n,), magnitude, device=device)
        images = apply_ops(images, ops, _signed(table, signed, ops, bins, generator))
    return images


def trivialaugment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment Wide: one op per sample at a magnitude bin drawn per sample."""
    n, device = images.shape[0], images.device
    table, signed = _magnitudes(wide=True, bins=NUM_BINS, size=tuple(images.shape[-2:]),
                                device=device)
    candidates = torch.tensor([OPS.index(op) for op in RANDOM_OPS], device=device)
    ops = candidates[torch.randint(len(candidates), (n,), generator=generator, device=device)]
    bins = torch.randint(NUM_BINS, (n,), generator=generator, device=device)
    return apply_ops(images, ops, _signed(table, signed, ops, bins, generator))


def autoaugment(images: torch.Tensor, generator: torch.Generator, *, policy: str
                ) -> torch.Tensor:
    """AutoAugment: a sub-policy per sample, then its two (op, probability, bin) steps."""
    n, device = images.shape[0], images.device
    height, width = images.shape[-2:]
    table, signed = _magnitudes(wide=False, bins=AUTOAUGMENT_BINS, size=(height, width),
                                device=device)
    steps_op, steps_prob, steps_bin = (t.to(device) for t in _subpolicies(
        resolve_autoaugment_policy(policy, height, width)))
    chosen = torch.randint(len(steps_op), (n,), generator=generator, device=device)
    identity = torch.zeros_like(chosen)
    for step in range(2):
        apply = torch.rand(n, generator=generator, device=device) <= steps_prob[chosen, step]
        ops = torch.where(apply, steps_op[chosen, step], identity)
        magnitudes = _signed(table, signed, ops, steps_bin[chosen, step], generator)
        images = apply_ops(images, ops, magnitudes)
    return images


def apply_ops(images: torch.Tensor, ops: torch.Tensor, magnitudes: torch.Tensor
              ) -> torch.Tensor:
    """Sample i gets op OPS[ops[i]] at magnitudes[i]; one call per op on its sub-batch."""
    out = images.clone()
    for k in ops.unique().tolist():
        if OPS[k] == "Identity":
            continue
        pick = (ops == k).nonzero().squeeze(1)
        out[pick] = op_functions()[OPS[k]](images[pick], magnitudes[pick])
    return out


def _signed(table: torch.Tensor, signed: torch.Tensor, ops: torch.Tensor, bins: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    """Each sample's magnitude; a signed op flips it with p=0.5 (torchvision: rand <= 0.5)."""
    flip = torch.rand(len(ops), generator=generator, device=ops.device) <= 0.5
    magnitudes = table[ops, bins]
    return torch.where(flip & signed[ops], -magnitudes, magnitudes)


@functools.lru_cache(maxsize=16)
def _magnitudes_cpu(wide: bool, bins: int, size: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(OPS), bins) magnitudes and per-op `signed`: torchvision's RandAugment/AutoAugment
    space, or TrivialAugmentWide's (`wide`). Posterize holds bits, Solarize a 0..255 threshold,
    translations pixels, rotation degrees, shears tan(angle), colour ops factor - 1."""
    height, width = size
    geometric = 0.99 if wide else 0.3
    linear = {"ShearX": geometric, "ShearY": geometric,
              "TranslateX": 32.0 if wide else 150.0 / 331.0 * width,
              "TranslateY": 32.0 if wide else 150.0 / 331.0 * height,
              "Rotate": 135.0 if wide else 30.0}
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):
        linear[op] = 0.99 if wide else 0.9
    table = torch.zeros(len(OPS), bins)
    for op, top in linear.items():
        table[OPS.index(op)] = torch.linspace(0.0, top, bins)
    posterize_steps = 6 if wide else 4
    table[OPS.index("Posterize")] = (8 - (torch.arange(bins) / ((bins - 1) / posterize_steps))
                                     ).round()
    table[OPS.index("Solarize")] = 255.0 * torch.linspace(1.0, 0.0, bins)
    signed = torch.tensor([op in linear for op in OPS])
    return table, signed


def _magnitudes(wide: bool, bins: int, size: tuple[int, int], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    table, signed = _magnitudes_cpu(wide, bins, size)
    return table.to(device), signed.to(device)


@functools.lru_cache(maxsize=4)
def _subpolicies(policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchvision's learned sub-policies as (S, 2) tensors of op index, probability, bin."""
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    learned = AutoAugment(AutoAugmentPolicy(policy)).policies
    ops = torch.tensor([[OPS.index(op) for op, _, _ in sub] for sub in learned])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in learned])
    bins = torch.tensor([[b or 0 for _, _, b in sub] for sub in learned])
    return ops, probs, bins


def op_functions() -> dict:
    """The ops by name (effrun/data/policy_ops.py), imported on first use: they need
    torchvision, which a run without a policy never imports (it costs ~2 s per process)."""
    from effrun.data.policy_ops import OP_FUNCTIONS

    return OP_FUNCTIONS
