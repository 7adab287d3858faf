"""The quantize stage: int8 that runs fast on x86 CPUs (torchao pt2e + Inductor).

Methods (compression/quantize=<name>): int8_ptq (static, calibrated), int8_qat (quantization-
aware training), int8_dynamic (Linear layers, run-time activation scales). All produce a
torch.export program (model.pt2); importing this package registers its loader in
effrun.artifacts, so `load_model("…/model.pt2")` returns the int8 model and its metadata.
"""

from effrun import artifacts
from effrun.compression.quantize.artifact import load_int8

artifacts.ARTIFACT_LOADERS[".pt2"] = load_int8
