"""The quantize stage: int8 that runs fast on x86 CPUs (torchao pt2e + Inductor).

Methods (compression/quantize=<name>): int8_ptq (static, calibrated), int8_qat (quantization-
aware training), int8_dynamic (Linear layers, run-time activation scales). All produce a
torch.export program (model.pt2); importing this package registers its loader in
effrun.artifacts, so `load_model("…/model.pt2")` returns the int8 model and its metadata.
int8_onnxruntime and int8_openvino quantize for those runtimes instead (model_int8.onnx,
model_int8_openvino.xml/.bin; backend_artifact.py registers their loaders too).
"""

from effrun import artifacts
from effrun.compression.quantize.artifact import load_int8
from effrun.compression.quantize.backend_artifact import load_onnx, load_openvino_ir

artifacts.ARTIFACT_LOADERS[".pt2"] = load_int8
# int8_onnxruntime's model_int8.onnx and int8_openvino's model_int8_openvino.xml (+ .bin):
# ONNX Runtime / OpenVINO models (effrun.backends.BackendModel), their runtime imported on load.
artifacts.ARTIFACT_LOADERS[".onnx"] = load_onnx
artifacts.ARTIFACT_LOADERS[".xml"] = load_openvino_ir
