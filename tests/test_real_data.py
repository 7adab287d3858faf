"""Real data: a short ResNet-20 training on a few thousand images of the JPEG CIFAR-10 copy.

Runs only when EFFRUN_CIFAR10_JPEG is set (CI sets it); fails loudly if it points nowhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import compose_cfg

from effrun import pipeline

ROOT = os.environ.get("EFFRUN_CIFAR10_JPEG")


@pytest.fixture
def cifar_root() -> Path:
    if not ROOT:
        pytest.skip("EFFRUN_CIFAR10_JPEG is not set")
    root = Path(ROOT)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.fail(f"EFFRUN_CIFAR10_JPEG={ROOT} but no train/ and test/ folders are there")
    return root


@pytest.mark.slow  # ~3 min; the fast suite covers decoding this tree (test_data) and training
def test_short_training_on_real_cifar10_beats_stated_accuracy(cifar_root, tmp_path):
    # 4,000 training images (8%), 4 epochs: well past the 10% of chance, in about a minute.
    cfg = compose_cfg(["dataset=cifar10", f"dataset.root={cifar_root}", "hardware=cpu",
                       "dataset.train_fraction=0.08", "train.epochs=4", "train.batch_size=64",
                       "optimizer=adamw", "optimizer.lr=3e-3", "optimizer.warmup_epochs=0.3",
                       "train.eval_every=0", "stages=[train]"])
    summary = pipeline.run(cfg, tmp_path)
    assert summary[0]["accuracy"] >= 0.35, summary[0]
