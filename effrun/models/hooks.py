"""Optional hooks a model may implement; the training code calls them when the model has them.

A model opts in by defining the method (no base class needed); the checks are
`isinstance(model, InitFromData)` and `isinstance(model, EpochStart)`.

InitFromData  `init_from_data(images)`: called once before training from scratch, with a seeded
              sample of normalized training images (airbench's data-dependent whitening conv).
EpochStart    `on_epoch_start(epoch)`: called at the start of every training epoch, 0-based
              (airbench freezes its whitening bias after a few epochs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class InitFromData(Protocol):
    def init_from_data(self, images: torch.Tensor) -> None: ...


@runtime_checkable
class EpochStart(Protocol):
    def on_epoch_start(self, epoch: int) -> None: ...
