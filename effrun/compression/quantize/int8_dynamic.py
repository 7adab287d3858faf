"""int8_dynamic: int8 weights, activations quantized per call at run time (nn.Linear only).

No calibration: activation scales come from each input. Suits Linear-heavy models (MLPs,
transformer blocks); conv layers stay float, so for conv nets int8_ptq is the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from effrun.compression.quantize.base import Int8Method
from effrun.compression.quantize.common import calibrate, x86_quantizer


@dataclass
class Int8Dynamic(Int8Method):
    max_accuracy_drop: float | None = None  # as in int8_ptq; null = off
    fallback_eval_images: int = 2000

    layer_types: ClassVar[tuple] = (nn.Linear,)

    def __post_init__(self) -> None:
        self._check_fallback()

    def quantize(self, exported, inputs, float_layers, reduce_range
                 ) -> tuple[torch.fx.GraphModule, dict]:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        prepared = prepare_pt2e(exported, x86_quantizer(is_dynamic=True, reduce_range=reduce_range,
                                                        float_layers=float_layers))
        # One pass records the weights' ranges; activation ranges are measured at run time.
        calibrate(prepared, inputs.data, 1, 2, inputs.seed)
        return convert_pt2e(prepared), {}
