"""int8_openvino: NNCF post-training quantization of the float parent's OpenVINO model.

The float parent is exported to ONNX (effrun.export) and converted to an OpenVINO model, as the
`export: [openvino]` IR is; `nncf.quantize` inserts FakeQuantize ops calibrated on the same
training images as int8_ptq (one seeded sampler: common.calibration_batches, same count, batch
size and seed). With `max_accuracy_drop`, `nncf.quantize_with_accuracy_control` (NNCF's
accuracy-aware flow: it ranks the quantized layers by their effect on the metric and reverts the
worst to float until the drop is within `max_drop`, absolute top-1) validates on the val split,
or on `fallback_eval_images` test images when the run has none (recorded: then the choice of
float layers has seen test images). Scored as deployed: the IR compiled by OpenVINO on the CPU
(effrun.backends: f32 precision hint). Deploys as model_int8_openvino.xml/.bin.

Why this flow and not NNCF's OpenVINOQuantizer in the pt2e flow (torch.export → torchao's
prepare_pt2e / calibrate / convert_pt2e → ov.convert_model): measured on a 4-epoch ResNet-20
(CIFAR copy, 1 thread, scripts/bench_int8_backends.py, README "int8 on ONNX Runtime and
OpenVINO"), both reach float top-1 (77.54% here, 77.65% pt2e, float 77.63%) and the same
latency within this loaded machine's noise, but OpenVINOQuantizer now ships in executorch
(not in nncf 3.4), which would be one more heavy dependency, its converted graph must stay
unfolded for OpenVINO's torch frontend, and only this flow has NNCF's accuracy control. What
did matter: NNCF's fast bias correction, its default, cost 1.5 points here (76.12%), in both
flows; `bias_correction` is off by default.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from effrun import backends
from effrun.compression.quantize import backend_artifact as ba
from effrun.compression.quantize.common import calibration_batches
from effrun.compression.quantize.runtime_int8 import Quantized, RuntimeInt8
from effrun.errors import EffrunError
from effrun.stage import StageInputs

log = logging.getLogger("effrun")

ARTIFACT = "model_int8_openvino.xml"  # + model_int8_openvino.bin
PRESETS = ("performance", "mixed")
BIAS_CORRECTIONS = ("none", "fast", "full")
VALIDATION_BATCH = 250


@dataclass
class Int8OpenVINO(RuntimeInt8):
    # NNCF preset: performance = symmetric activations; mixed = asymmetric activations (for
    # activations that are not centred at zero, e.g. without a ReLU before a conv).
    preset: str = "performance"
    # NNCF's bias correction after quantizing: none | fast | full. Off by default: on the
    # ResNet-20 below, fast bias correction (NNCF's default) cost 1.5 points of top-1 (76.12%
    # vs 77.54% without, float 77.63%).
    bias_correction: str = "none"
    float_layers: list[str] = field(default_factory=list)  # OpenVINO op names kept float
    # Accuracy-aware flow (nncf.quantize_with_accuracy_control): the most top-1 (fraction,
    # 0.003 = 0.3 points) int8 may lose against the float model; null = plain nncf.quantize.
    max_accuracy_drop: float | None = None
    fallback_eval_images: int = 2000  # test images validated on when there is no val split

    backend: ClassVar[str] = "openvino"
    libraries: ClassVar[tuple[str, ...]] = ("openvino", "nncf", "onnx")

    def __post_init__(self) -> None:
        self.check()
        if self.preset not in PRESETS:
            raise ValueError(f"{self.key}.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"{self.key}.bias_correction must be one of {BIAS_CORRECTIONS}, "
                             f"got {self.bias_correction!r}")

    def quantize(self, model: nn.Module, example: torch.Tensor, inputs: StageInputs
                 ) -> Quantized:
        ov = ba.need("openvino", "int8_openvino")
        nncf = ba.need("nncf", "int8_openvino")
        with tempfile.TemporaryDirectory(dir=inputs.stage_dir, prefix=".int8-ov-") as tmp:
            onnx_path = ba.export_parent(model, example, Path(tmp) / "float.onnx",
                                         "int8_openvino")
            float_ov = ov.convert_model(str(onnx_path))
            self._check_float_layers(float_ov)
            quantized, method_metrics = self._quantize(float_ov, model, inputs, nncf)
            # Scored as deployed: the IR as written, compiled by effrun.backends.
            xml = ba.save_openvino(quantized, Path(tmp) / ARTIFACT, {})
            deployed = backends.load(xml, "openvino", torch.get_num_threads())
            # The IR's .bin is exactly its constants: int8 weights, scales, float biases.
            weight_bytes = xml.with_suffix(".bin").stat().st_size
            float_layers = ba.openvino_float_layers(ov.Core().read_model(str(xml)))
        settings = {"preset": self.preset, "bias_correction": self.bias_correction,
                    "openvino": ov.__version__, "nncf": nncf.__version__}

        def save(stage_dir: Path, meta: dict) -> Path:
            return ba.save_openvino(quantized, Path(stage_dir) / ARTIFACT, meta)

        return Quantized(deployed=deployed, weight_bytes=weight_bytes, float_layers=float_layers,
                         settings=settings, metrics=method_metrics, save=save)

    def _check_float_layers(self, float_ov) -> None:
        names = {op.get_friendly_name() for op in float_ov.get_ops()}
        unknown = [n for n in self.float_layers if n not in names]
        if unknown:
            layers = [op.get_friendly_name() for op in float_ov.get_ops()
                      if op.get_type_name() in ("Convolution", "MatMul")]
            raise EffrunError(f"{self.key}.float_layers: no OpenVINO op named {unknown[0]!r}; "
                              f"its Convolution/MatMul ops are e.g. {layers[:4]}")

    def _quantize(self, float_ov, model: nn.Module, inputs: StageInputs, nncf):
        """nncf.quantize, or with max_accuracy_drop quantize_with_accuracy_control; returns the
        quantized ov.Model and the method's figures."""
        batches = ba.numpy_batches(calibration_batches(
            inputs.data, self.calibration_batches, self.calibration_batch_size, inputs.seed))
        calibration = nncf.Dataset(batches)
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        common = {"preset": getattr(nncf.QuantizationPreset, self.preset.upper()),
                  "subset_size": len(batches), "target_device": nncf.TargetDevice.CPU,
                  "fast_bias_correction": self.bias_correction != "full",
                  "ignored_scope": (nncf.IgnoredScope(names=list(self.float_layers))
                                    if self.float_layers else None)}
        advanced = AdvancedQuantizationParameters(
            disable_bias_correction=self.bias_correction == "none")
        figures = {"calibration_images": int(sum(len(b) for b in batches))}
        if self.max_accuracy_drop is None:
            return nncf.quantize(float_ov, calibration, advanced_parameters=advanced,
                                 **common), figures
        split, x, y = self._validation_images(inputs)
        validation = nncf.Dataset(list(zip(x, y, strict=True)), lambda item: item[0])
        precisions: set[str] = set()

        def top1(compiled, items) -> float:
            precisions.add(str(compiled.get_property("INFERENCE_PRECISION_HINT")))
            correct = total = 0
            for images, labels in items:
                logits = compiled(images)[0]
                correct += int((np.argmax(logits, 1) == labels).sum())
                total += len(labels)
            return correct / total

        quantized = nncf.quantize_with_accuracy_control(
            float_ov, calibration, validation, top1, max_drop=self.max_accuracy_drop,
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
            **common)
        return quantized, {**figures, "fallback": {
            "max_accuracy_drop": self.max_accuracy_drop, "split": split,
            "eval_images": int(sum(len(b) for b in y)),
            # NNCF compiles the candidates itself, with OpenVINO's default precision for float
            # ops (bf16 on CPUs with AVX-512 BF16 or AMX), not the f32 effrun deploys with.
            "validation_precision": sorted(precisions)}}

    def _validation_images(self, inputs: StageInputs):
        """The first `fallback_eval_images` images of the val split when there is one, else of
        the test split (as fallback.py scores), normalized as effrun's loader does, in batches;
        (split, image batches, label batches)."""
        from effrun.data import BatchLoader

        data = inputs.data
        split = "val" if data.val_x is not None else "test"
        x, y = (data.val_x, data.val_y) if split == "val" else (data.test_x, data.test_y)
        n = self.fallback_eval_images
        loader = BatchLoader(x[:n], y[:n], VALIDATION_BATCH, mean=data.mean, std=data.std)
        images, labels = [], []
        for batch_x, batch_y in loader:
            images.append(batch_x.to(torch.float32).contiguous().numpy())
            labels.append(batch_y.numpy())
        return split, images, labels
