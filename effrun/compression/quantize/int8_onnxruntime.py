"""int8_onnxruntime: static int8 for ONNX Runtime (QDQ format, per-channel int8 weights).

The float parent is exported to ONNX (effrun.export), optimized by ONNX Runtime's
`quant_pre_process` (shape inference; conv+BN folding, which QDQ needs so that BN is not
quantized on its own), calibrated on the same training images as int8_ptq (one seeded sampler:
common.calibration_batches, same count, batch size and seed) and quantized with
`onnxruntime.quantization.quantize_static`. Scored as deployed: an ONNX Runtime session on the
CPU (effrun.backends), plain fp32 inputs, the run's TTA. Deploys as model_int8.onnx.

With `max_accuracy_drop`, fallback.py's algorithm keeps the most sensitive Conv/Gemm/MatMul
nodes float (`nodes_to_exclude`); the calibration ranges are computed once and reused for
every candidate (ORT's calibration cache).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from effrun import backends
from effrun.compression.quantize import backend_artifact as ba
from effrun.compression.quantize.common import QuantizeError, calibration_batches
from effrun.compression.quantize.fallback import accuracy_fallback
from effrun.compression.quantize.runtime_int8 import Quantized, RuntimeInt8
from effrun.errors import EffrunError
from effrun.hardware import cpu_int8_isa
from effrun.stage import StageInputs

log = logging.getLogger("effrun")

ARTIFACT = "model_int8.onnx"
QUANT_OPS = ("Conv", "Gemm", "MatMul")  # the ops given int8 weights (the fallback's layers)
ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATE_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass
class Int8OnnxRuntime(RuntimeInt8):
    # Activations: uint8 (U8S8, ONNX Runtime's fast x86 path) or int8 (S8S8). Measured on a
    # ResNet-20 (AVX-512 VNNI, 1 thread): S8S8 ran 2.8x slower at batch 1, same top-1.
    activation_type: str = "uint8"
    per_channel: bool = True  # int8 weights per output channel (else one scale per tensor)
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    # 7-bit activations: avoids u8*s8 overflow on CPUs without VNNI; null = on exactly then.
    reduce_range: bool | None = None
    preprocess: bool = True  # quant_pre_process (shape inference, conv+BN folding) first
    float_layers: list[str] = field(default_factory=list)  # ONNX node names kept float
    # Accuracy-aware fallback, as int8_ptq: the most top-1 (fraction) int8 may lose; null = off.
    max_accuracy_drop: float | None = None
    fallback_eval_images: int = 2000

    backend: ClassVar[str] = "onnxruntime"
    libraries: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")

    def __post_init__(self) -> None:
        self.check()
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(f"{self.key}.activation_type must be one of {ACTIVATION_TYPES}, "
                             f"got {self.activation_type!r}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ValueError(f"{self.key}.calibrate_method must be one of "
                             f"{list(CALIBRATE_METHODS)}, got {self.calibrate_method!r}")

    def quantize(self, model: nn.Module, example: torch.Tensor, inputs: StageInputs
                 ) -> Quantized:
        ort = ba.need("onnxruntime", "int8_onnxruntime")
        import onnx

        isa = cpu_int8_isa()
        reduce_range = (self.reduce_range if self.reduce_range is not None
                        else isa in ("avx2", "none", "unknown"))
        with tempfile.TemporaryDirectory(dir=inputs.stage_dir, prefix=".int8-ort-") as tmp:
            float_onnx = self._float_onnx(model, example, Path(tmp))
            session_model, float_layers, method_metrics = self._quantize(
                float_onnx, Path(tmp), model, inputs, reduce_range)
            quantized = onnx.load(str(session_model.path))
        settings = {"activation_type": self.activation_type, "per_channel": self.per_channel,
                    "calibrate_method": self.calibrate_method, "reduce_range": reduce_range,
                    "preprocess": self.preprocess, "onnxruntime": ort.__version__,
                    "cpu_int8_isa": isa}

        def save(stage_dir: Path, meta: dict) -> Path:
            return ba.save_onnx(quantized, Path(stage_dir) / ARTIFACT, meta)

        return Quantized(deployed=session_model,
                         weight_bytes=ba.onnx_initializer_bytes(quantized),
                         float_layers=float_layers, settings=settings, metrics=method_metrics,
                         save=save)

    def _float_onnx(self, model: nn.Module, example: torch.Tensor, tmp: Path) -> Path:
        """The float parent as ONNX, pre-processed for quantization when `preprocess`."""
        exported = ba.export_parent(model, example, tmp / "float.onnx", "int8_onnxruntime")
        if not self.preprocess:
            return exported
        from onnxruntime.quantization.shape_inference import quant_pre_process
        quant_pre_process(str(exported), str(tmp / "float_pre.onnx"))
        return tmp / "float_pre.onnx"

    def _quantize(self, float_onnx: Path, tmp: Path, model: nn.Module, inputs: StageInputs,
                  reduce_range: bool) -> tuple[backends.BackendModel, list[str], dict]:
        """Quantize (and with max_accuracy_drop fall back node by node); returns the ONNX
        Runtime model of the final file, the nodes kept float and the method's figures."""
        import onnx
        layers = [n.name for n in onnx.load(str(float_onnx)).graph.node
                  if n.op_type in QUANT_OPS]
        unknown = [n for n in self.float_layers if n not in layers]
        if unknown:
            raise EffrunError(f"{self.key}.float_layers: no Conv/Gemm/MatMul node named "
                              f"{unknown[0]!r} in the ONNX graph; nodes are e.g. {layers[:4]}")
        if not layers:
            raise QuantizeError("the ONNX graph has no Conv/Gemm/MatMul node to run in int8")
        cache = tmp / "calibration.json"  # ranges measured once, reused by every candidate
        count = [0]

        def quantize(float_layers: list[str]) -> backends.BackendModel:
            count[0] += 1
            out = tmp / f"int8_{count[0]}.onnx"
            self._quantize_static(float_onnx, out, inputs, float_layers, reduce_range, cache)
            return backends.load(out, "onnxruntime", torch.get_num_threads())

        figures = {"calibration_images": self._calibration_count(inputs)}
        if self.max_accuracy_drop is None:
            return quantize(list(self.float_layers)), list(self.float_layers), figures
        final, report = accuracy_fallback(
            quantize, layers, model, inputs, max_drop=self.max_accuracy_drop,
            eval_images=self.fallback_eval_images, start=list(self.float_layers))
        return final, report["float_layers"], {**figures, "fallback": report}

    def _calibration_count(self, inputs: StageInputs) -> int:
        return min(self.calibration_batches * self.calibration_batch_size,
                   len(inputs.data.train_y))

    def _quantize_static(self, float_onnx: Path, out: Path, inputs: StageInputs,
                         float_layers: list[str], reduce_range: bool, cache: Path) -> None:
        from onnxruntime import quantization as q

        reader = None if cache.is_file() else CalibrationImages(
            calibration_batches(inputs.data, self.calibration_batches,
                                self.calibration_batch_size, inputs.seed))
        activation = q.QuantType.QUInt8 if self.activation_type == "uint8" else q.QuantType.QInt8
        q.quantize_static(
            str(float_onnx), str(out), reader, quant_format=q.QuantFormat.QDQ,
            op_types_to_quantize=None, per_channel=self.per_channel, reduce_range=reduce_range,
            activation_type=activation, weight_type=q.QuantType.QInt8,
            nodes_to_exclude=list(float_layers),
            calibrate_method=getattr(q.CalibrationMethod,
                                     CALIBRATE_METHODS[self.calibrate_method]),
            calibration_cache_path=str(cache))
        if float_layers:
            import onnx
            quantized = onnx.load(str(out))
            float_inputs(quantized, set(float_layers))
            onnx.save(quantized, str(out))


def float_inputs(model, nodes: set[str]) -> None:
    """Feed the `nodes` kept float their inputs unquantized (X, not DQ(Q(X))).

    quantize_static leaves an excluded node's weights float but its input QDQ in place; ONNX
    Runtime's graph optimizer then fuses DequantizeLinear -> Gemm/MatMul into an integer
    matmul that quantizes the float weights itself, per tensor (measured: a Gemm kept float
    this way scored chance accuracy under ORT_ENABLE_ALL, correct with optimizations off)."""
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producers.get(name)
            q = dq is not None and dq.op_type == "DequantizeLinear" and producers.get(dq.input[0])
            if q and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]


class CalibrationImages:
    """onnxruntime.quantization.CalibrationDataReader over effrun's calibration batches."""

    def __init__(self, batches):
        self.batches = iter(ba.numpy_batches(batches))

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}
