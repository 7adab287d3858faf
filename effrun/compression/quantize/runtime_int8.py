"""The flow int8_onnxruntime and int8_openvino share; each method only says how it turns the
float parent into its runtime's int8 model.

float parent → checks → float top-1 (plain fp32 CPU) → method.quantize (export, calibrate on
the int8_ptq images, optional accuracy fallback) → top-1 of the runtime's model as deployed →
StageResult whose saver writes the runtime's file and whose Deployment names the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from effrun.compression.quantize.backend_artifact import need
from effrun.compression.quantize.common import (
    QuantizeError,
    example_batch,
    float_bytes,
    is_quantized,
    plain_cpu,
)
from effrun.errors import EffrunError
from effrun.measure import ModelFigures, count_flops, count_params
from effrun.stage import Deployment, StageInputs, StageResult

log = logging.getLogger("effrun")


@dataclass
class Quantized:
    """What a runtime method's `quantize` returns."""

    deployed: nn.Module  # the runtime's model (effrun.backends.BackendModel), scored as is
    weight_bytes: int  # bytes of its constants: int8 weights, scales, float biases
    float_layers: list[str]  # layers (runtime node names) kept float
    settings: dict  # the method's settings and library versions, also stored in the artifact
    metrics: dict  # the method's own figures (calibration images, fallback report)
    save: Callable[[Path, dict], Path]  # save(stage_dir, artifact meta) -> artifact path


@dataclass
class RuntimeInt8:
    """Shared keys and checks: the same calibration keys (and defaults) as int8_ptq, so the
    same images, a fair comparison; the accuracy-aware fallback's tolerance."""

    calibration_batches: int = 32
    calibration_batch_size: int = 64

    backend: ClassVar[str] = ""
    libraries: ClassVar[tuple[str, ...]] = ()  # checked before any work (the deploy extra)
    key: ClassVar[str] = "compression.quantize"

    def quantize(self, model: nn.Module, example, inputs: StageInputs) -> Quantized:
        raise NotImplementedError

    def check(self) -> None:
        """The range checks both methods share (called from __post_init__)."""
        for name in ("calibration_batches", "calibration_batch_size", "fallback_eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.key}.{name} must be >= 1, got {getattr(self, name)}")
        drop = getattr(self, "max_accuracy_drop", None)
        if drop is not None and not 0 <= drop < 1:
            raise ValueError(f"{self.key}.max_accuracy_drop is a fraction of top-1 in [0, 1) "
                             f"(0.003 = 0.3 points) or null, got {drop}")

    def __call__(self, model: nn.Module, inputs: StageInputs) -> StageResult:
        name = f"int8_{self.backend}"
        for library in self.libraries:
            need(library, name)
        if len(inputs.data.train_y) == 0:
            raise EffrunError(f"{name} calibrates on training images and the dataset has none")
        if is_quantized(model):
            raise QuantizeError("the parent model is already quantized: quantize a float model")
        model = model.cpu().eval()
        example = example_batch(inputs.data)
        float_acc = inputs.evaluate(model, hw=plain_cpu())["accuracy"]
        figures = ModelFigures(params=count_params(model),
                               flops=count_flops(model, (1, *example.shape[1:])), weight_bytes=0)
        q = self.quantize(model, example, inputs)
        acc = inputs.evaluate(q.deployed, hw=plain_cpu())["accuracy"]
        figures.weight_bytes = q.weight_bytes
        float_size = float_bytes(model)
        log.info("quantize: %s int8 top-1 %.4f (float %.4f), %d -> %d bytes, %d float layer(s)",
                 self.backend, acc, float_acc, float_size, q.weight_bytes, len(q.float_layers))
        metrics = {**q.settings, **q.metrics, "float_accuracy": float_acc,
                   "accuracy_drop": float_acc - acc, "float_weight_bytes": float_size,
                   "weight_ratio": q.weight_bytes / float_size, "float_layers": q.float_layers}
        deploy = Deployment(precision="int8", backend=self.backend, device="cpu",
                            compare_to=str(inputs.parent.artifact) if inputs.parent else None)
        extra = {"method": type(self).__name__, **q.settings, "float_layers": q.float_layers,
                 "weight_bytes": q.weight_bytes, "float_weight_bytes": float_size,
                 "example_shape": list(example.shape)}
        return StageResult(model=q.deployed, accuracy=acc, metrics=metrics, figures=figures,
                           artifact_meta=extra, deploy=deploy, save=q.save)
