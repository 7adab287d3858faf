"""Generated image classification data: no download, deterministic from the seed, learnable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effrun.data.splits import DatasetBase, DataSplits

# Independent random streams so that e.g. changing num_train never changes the test set.
_PROTOTYPE_STREAM = 0
_TRAIN_STREAM = 1
_TEST_STREAM = 2


@dataclass
class SyntheticData(DatasetBase):
    """Each class is a small colour motif tiled over the image; samples are noisy variations.

    A class owns a blurred random RGB tile (side image_size // 4) and a weak colour tint.
    Every sample tiles its class motif at a random phase (so position carries no class
    information), flips it horizontally half the time (so flip augmentation preserves the
    label), fades it under a smooth random envelope, and adds a class-independent smooth
    distractor pattern, contrast/brightness/colour jitter and per-pixel Gaussian `noise`
    (0..1 pixel units). A share `confusion` of samples shows another (random) class's motif and
    tint under its own label: irreducible error, so top-1 stays below ~1 - confusion * (K-1)/K.
    Calibrated at the defaults (seed 0, confusion 0): a linear model on pixels gets ~22% test
    accuracy, mean colour alone ~29%; a ResNet-20 (SGD one-cycle, batch 128, crop+flip) reaches
    95% after epoch 2 and 99.9% after 3 epochs. With num_train=2000, confusion=0.15 (ceiling
    86.5%), AdamW 3e-3 batch 64, 4 epochs: 74.7% (bf16) / 76.1% (fp32).
    """

    num_classes: int = 10
    num_train: int = 2048
    num_test: int = 1000
    image_size: int = 32
    noise: float = 0.12  # per-pixel Gaussian noise, 0..1 pixel units
    # Share of samples showing another class's motif (irreducible error: caps top-1 near
    # 1 - 0.9 x this); 0.15 keeps effrun's first run from learning its data perfectly.
    confusion: float = 0.15

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 2:
            raise ValueError(f"dataset.num_classes must be >= 2, got {self.num_classes}")
        if self.num_train < self.num_classes:
            raise ValueError(
                f"dataset.num_train must be >= num_classes ({self.num_classes}), "
                f"got {self.num_train}"
            )
        if self.num_test < 1:
            raise ValueError(f"dataset.num_test must be >= 1, got {self.num_test}")
        if self.image_size < 8:
            raise ValueError(f"dataset.image_size must be >= 8, got {self.image_size}")
        if self.noise < 0:
            raise ValueError(f"dataset.noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.confusion < 1.0:
            raise ValueError(f"dataset.confusion must be in [0, 1), got {self.confusion}")

    def _load_full(self, seed: int) -> DataSplits:
        proto_gen = _generator(seed, _PROTOTYPE_STREAM)
        motifs = _motifs(self.num_classes, self.image_size // 4, proto_gen)
        tints = 0.03 * torch.randn(self.num_classes, 3, 1, 1, generator=proto_gen)

        train_x, train_y = self._samples(
            motifs, tints, self.num_train, _generator(seed, _TRAIN_STREAM)
        )
        test_x, test_y = self._samples(motifs, tints, self.num_test, _generator(seed, _TEST_STREAM))
        classes = [f"class{i}" for i in range(self.num_classes)]
        return DataSplits(train_x, train_y, test_x, test_y, classes=classes)

    def _samples(
        self,
        motifs: torch.Tensor,
        tints: torch.Tensor,
        count: int,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image_size
        period = motifs.shape[-1]
        # Balanced labels in random order: every class gets count // num_classes (+1) samples.
        labels = torch.arange(count) % self.num_classes
        labels = labels[torch.randperm(count, generator=generator)]

        # Tile each motif over the image with a random phase: position carries no class
        # information, so a linear template cannot work but a conv net finds the local motif.
        dy = torch.randint(0, period, (count, 1), generator=generator)
        dx = torch.randint(0, period, (count, 1), generator=generator)
        rows = ((dy + torch.arange(size)) % period)[:, None, :, None]
        cols = ((dx + torch.arange(size)) % period)[:, None, None, :]
        flip = torch.rand(count, generator=generator) < 0.5

        # A smooth random envelope fades the motif in parts of the image.
        envelope = (0.75 + 0.5 * _smooth_patterns(count, size, generator)).clamp(0.0, 1.5)
        distractor = _smooth_patterns(count, size, generator)
        contrast = 0.7 + 0.6 * torch.rand(count, 1, 1, 1, generator=generator)
        brightness = 0.1 * torch.randn(count, 1, 1, 1, generator=generator)
        colour_jitter = 0.05 * torch.randn(count, 3, 1, 1, generator=generator)
        pixel_noise = self.noise * torch.randn(count, 3, size, size, generator=generator)

        # Irreducible error: a share `confusion` of samples shows another class's motif and tint
        # (drawn last, so confusion=0 gives the same images as before the knob existed).
        shown = labels
        if self.confusion > 0:
            swap = torch.rand(count, generator=generator) < self.confusion
            other = torch.randint(1, self.num_classes, (count,), generator=generator)
            shown = torch.where(swap, (labels + other) % self.num_classes, labels)
        channels = torch.arange(3)[None, :, None, None]
        signal = motifs[shown[:, None, None, None], channels, rows, cols]
        signal = torch.where(flip[:, None, None, None], signal.flip(-1), signal)

        image = (
            0.5
            + 0.15 * contrast * envelope * signal
            + 0.12 * distractor
            + tints[shown]
            + brightness
            + colour_jitter
            + pixel_noise
        )
        image = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).contiguous()
        return image, labels


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1009 + stream)


def _motifs(count: int, period: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance RGB tiles that wrap around seamlessly (blurred with circular padding)."""
    tiles = torch.randn(count, 3, period, period, generator=generator)
    blur = torch.tensor([0.25, 0.5, 0.25])
    kernel = (blur[:, None] * blur[None, :]).expand(3, 1, 3, 3)
    tiles = F.conv2d(F.pad(tiles, (1, 1, 1, 1), mode="circular"), kernel, groups=3)
    tiles -= tiles.mean(dim=(1, 2, 3), keepdim=True)
    return tiles / tiles.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def _smooth_patterns(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Unit-variance RGB patterns: a 4x4 random grid upsampled smoothly to size x size."""
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    pattern = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    pattern -= pattern.mean(dim=(1, 2, 3), keepdim=True)
    return pattern / pattern.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
