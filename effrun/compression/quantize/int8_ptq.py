"""int8_ptq: static post-training quantization, calibrated on unaugmented training batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effrun.compression.quantize.base import Int8Method
from effrun.compression.quantize.common import calibrate, x86_quantizer
from effrun.errors import EffrunError


@dataclass
class Int8PTQ(Int8Method):
    calibration_batches: int = 32
    calibration_batch_size: int = 64
    # Accuracy-aware fallback: the most top-1 (fraction, 0.003 = 0.3 points) int8 may lose
    # against the float parent before sensitive layers go back to float; null = off.
    max_accuracy_drop: float | None = None
    fallback_eval_images: int = 2000

    def __post_init__(self) -> None:
        self._check_positive("calibration_batches", self.calibration_batches)
        self._check_positive("calibration_batch_size", self.calibration_batch_size)
        self._check_fallback()

    def check_data(self, inputs) -> None:
        if len(inputs.data.train_y) == 0:
            raise EffrunError("int8_ptq calibrates on training images and the dataset has none")

    def quantize(self, exported, inputs, float_layers, reduce_range
                 ) -> tuple[torch.fx.GraphModule, dict]:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        prepared = prepare_pt2e(exported, x86_quantizer(reduce_range=reduce_range,
                                                        float_layers=float_layers))
        seen = calibrate(prepared, inputs.data, self.calibration_batches,
                         self.calibration_batch_size, inputs.seed)
        return convert_pt2e(prepared), {"calibration_batches": seen}
