"""int8_qat: quantization-aware training, then the same int8 conversion as int8_ptq.

Fake-quant nodes (and conv+BN folding as int8 will see it) are inserted into the exported
graph, which is fine-tuned with the spine's training loop at a small learning rate. Under
torchrun every rank fine-tunes its shard of each global batch (DDP); rank 0 alone compiles,
scores and saves the int8 graph. hardware.sync_bn does not reach into the exported graph (its
BatchNorm is an op, not a layer to swap): each rank normalises with its half batch's statistics
and DDP keeps every rank on rank 0's running statistics and fake-quant ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from effrun import distributed
from effrun.compression.quantize.base import Int8Method
from effrun.compression.quantize.common import x86_quantizer
from effrun.errors import EffrunError


@dataclass
class Int8QAT(Int8Method):
    epochs: int = 2
    lr: float = 0.005  # peak of a cosine schedule without warmup; the run's optimizer otherwise

    export_in_train_mode: ClassVar[bool] = True  # BN trains during QAT
    trains_across_ranks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check_positive("epochs", self.epochs)
        if self.lr <= 0:
            raise ValueError(f"{self.key}.lr must be > 0, got {self.lr}")

    def check_data(self, inputs) -> None:
        if len(inputs.data.train_y) < inputs.train.batch_size:
            raise EffrunError(f"int8_qat fine-tunes on training images: the dataset has "
                              f"{len(inputs.data.train_y)}, fewer than train.batch_size")

    def quantize(self, exported, inputs, float_layers, reduce_range
                 ) -> tuple[torch.fx.GraphModule, dict]:
        from torchao.quantization.pt2e import (
            allow_exported_model_train_eval,
            move_exported_model_to_eval,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

        prepared = prepare_qat_pt2e(exported, x86_quantizer(
            is_qat=True, reduce_range=reduce_range, float_layers=float_layers))
        allow_exported_model_train_eval(prepared)  # the training loop calls train()/eval()
        optimizer = replace(inputs.optimizer, lr=self.lr, schedule="cosine", warmup_epochs=0.0)
        # Contiguous layout: the graph hides its convs from the spine's check for the oneDNN
        # channels_last backward crash (strided 1x1 convs on < 8 channels), which it does hit.
        # fp32: fake-quant nodes compute in float32 and fail on bf16 activations (autocast).
        # The CPU: the x86 int8 graph it converts to runs there.
        hw = replace(inputs.hw, device="cpu", channels_last=False, precision="fp32")
        fitted = inputs.fit(prepared, epochs=self.epochs, optimizer=optimizer, name="qat", hw=hw)
        move_exported_model_to_eval(prepared)
        return convert_pt2e(prepared.cpu()), {"qat": {
            "epochs": self.epochs, "history": fitted["history"],
            "ranks": distributed.rank_and_world()[1],  # 1 = not trained across torchrun ranks
            "fake_quant_test_accuracy": fitted["test_accuracy"]}}
