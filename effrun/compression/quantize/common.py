"""What every int8 method shares: preflight, export, the x86 quantizer, compile, size, evaluation.

The path is torchao's pt2e flow: torch.export (strict, dynamic batch) → annotate with
X86InductorQuantizer → calibrate or train → convert_pt2e (a graph of quantize/dequantize ops
around float convs) → torch.compile with Inductor freezing on, which is what turns the q/dq
patterns into fused oneDNN int8 kernels. Run uncompiled, the converted graph executes the
reference q/dq ops and is several times *slower* than fp32; only the compiled form is fast.
"""

from __future__ import annotations

import importlib.metadata
import logging
import operator
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from effrun.compile import FUSED_INT8_OP, INFERENCE_OPTIONS  # noqa: F401
from effrun.data import BatchLoader
from effrun.errors import EffrunError
from effrun.hardware import Hardware, cpu_int8_isa
from effrun.measure import tensor_bytes

log = logging.getLogger("effrun")

MIN_TORCH = (2, 6)
MIN_TORCHAO = (0, 12)
MAX_BATCH = 4096  # upper bound of the exported dynamic batch dimension
# Inductor settings the int8 graph must be compiled with: freezing turns weights into constants,
# which the x86 int8 fusion passes need to prepack them for oneDNN.
COMPILE_OPTIONS = INFERENCE_OPTIONS  # int8 graphs run as float inference compiles
QUANT_OPS = ("quantized_decomposed.", "onednn.q")
# The layer types the x86 int8 path runs in int8; other weight layers stay float.
INT8_LAYERS = (nn.Conv2d, nn.Linear)
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.Embedding, nn.Bilinear)


class QuantizeError(EffrunError):
    """A problem found before quantizing (the model, this torch, this machine), one line."""


def _version(dist: str) -> tuple[int, ...]:
    raw = importlib.metadata.version(dist)
    return tuple(int(p) for p in re.findall(r"\d+", raw.split("+")[0])[:2])


def find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def is_quantized(model: nn.Module) -> bool:
    """True for a model that already holds int8 ops (a pt2e graph or eager quantized modules)."""
    gm = getattr(model, "gm", model)
    if isinstance(gm, torch.fx.GraphModule):
        if any(n.op == "call_function" and str(n.target).startswith(QUANT_OPS)
               for n in gm.graph.nodes):
            return True
    return any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
               for m in model.modules())


def preflight(model: nn.Module, hw: Hardware, *, float_layers: Iterable[str] = (),
              layer_types: tuple = INT8_LAYERS, compile_needed: bool = True) -> dict:
    """Every check that can fail, before any work; raises QuantizeError with one line."""
    if _version("torch") < MIN_TORCH:
        raise QuantizeError(f"int8 quantization needs torch>={'.'.join(map(str, MIN_TORCH))}, "
                            f"found {torch.__version__}")
    try:
        torchao_version = _version("torchao")
        import torchao.quantization.pt2e  # noqa: F401
    except (importlib.metadata.PackageNotFoundError, ImportError) as e:
        raise QuantizeError(f"int8 quantization needs torchao (pip install 'torchao>=0.12'): "
                            f"{str(e).splitlines()[0]}") from None
    if torchao_version < MIN_TORCHAO:
        raise QuantizeError(f"int8 quantization needs torchao>={'.'.join(map(str, MIN_TORCHAO))}"
                            f" (its pt2e flow), found {importlib.metadata.version('torchao')}")
    engines = torch.backends.quantized.supported_engines
    if not torch.backends.mkldnn.is_available() or not {"x86", "onednn"} & set(engines):
        raise QuantizeError(f"this torch build has no oneDNN int8 engine (quantized engines: "
                            f"{engines}); install a standard x86 torch wheel")
    compiler = find_compiler()
    if compile_needed and compiler is None:
        raise QuantizeError("Inductor needs a C++ compiler on the CPU to build the fused int8 "
                            "kernels and none was found (CXX, g++, c++, clang++): install one, "
                            "e.g. apt-get install g++")
    if is_quantized(model):
        raise QuantizeError("the parent model is already quantized (it holds int8 ops): quantize "
                            "a float model, e.g. init_from=<a float model.pt>")
    warnings = []
    if hw.torch_device.type != "cpu":
        warnings.append(f"the run uses {hw.torch_device}; the x86 int8 model is built, scored "
                        f"and benchmarked on the CPU")
    isa = cpu_int8_isa()
    if isa in ("avx2", "none", "unknown"):
        warnings.append(f"this CPU has no VNNI/AMX int8 instructions ({isa}): oneDNN int8 runs "
                        f"on AVX2 at best, so expect ~2x rather than ~4x over fp32")
    layers = dict(model.named_modules())
    int8_layers = [n for n, m in layers.items() if isinstance(m, layer_types)]
    if not int8_layers:
        kinds = "/".join(t.__name__ for t in layer_types)
        raise QuantizeError(f"the model has no {kinds} layer, so this method has nothing to run "
                            f"in int8")
    others = sorted({type(m).__name__ for m in layers.values()
                     if isinstance(m, WEIGHT_LAYERS) and not isinstance(m, layer_types)})
    if others:
        warnings.append(f"layers of type {', '.join(others)} are not supported in int8 by this "
                        f"method and stay float")
    for name in float_layers:
        if name not in layers:
            raise QuantizeError(f"compression.quantize.float_layers: no layer named {name!r}; "
                                f"int8 layers are e.g. {int8_layers[:4]}")
        if not isinstance(layers[name], layer_types):
            raise QuantizeError(f"compression.quantize.float_layers: {name!r} is a "
                                f"{type(layers[name]).__name__}, not an int8 layer")
    for w in warnings:
        log.warning("quantize preflight: %s", w)
    return {"torch": torch.__version__, "torchao": importlib.metadata.version("torchao"),
            "compiler": compiler, "cpu_int8_isa": isa, "quantized_engines": list(engines),
            "warnings": warnings}


def int8_layer_names(model: nn.Module, layer_types: tuple = INT8_LAYERS) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, layer_types)]


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The one torch.export call: strict, with a dynamic batch dimension (1..MAX_BATCH)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True)


def export_model(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """torch.export (strict) with a dynamic batch dimension, as a GraphModule."""
    try:
        ep = export_program(model, example)
    except Exception as e:  # export errors are long; the first line names the construct
        raise QuantizeError(f"torch.export (strict) cannot capture this model, so it cannot be "
                            f"int8-quantized: {str(e).strip().splitlines()[0]}") from None
    return ep.module()


def x86_quantizer(*, is_qat: bool = False, is_dynamic: bool = False, reduce_range: bool = False,
                  float_layers: Iterable[str] = ()):
    """The x86 Inductor quantizer: uint8 activations, per-channel symmetric int8 weights."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(
        is_qat=is_qat, is_dynamic=is_dynamic, reduce_range=reduce_range)
    quantizer = xiq.X86InductorQuantizer().set_global(config)
    for name in float_layers:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def example_batch(data, batch_size: int = 2) -> torch.Tensor:
    loader = BatchLoader(data.train_x[:batch_size], data.train_y[:batch_size], batch_size,
                         mean=data.mean, std=data.std)
    return next(iter(loader))[0]


def calibration_batches(data, batches: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The calibration images every static int8 method sees: the first `batches` shuffled,
    unaugmented, normalized training batches of the seeded loader (one sampler for all, so
    int8_ptq, int8_onnxruntime and int8_openvino calibrate on the same images)."""
    loader = BatchLoader(data.train_x, data.train_y, batch_size, mean=data.mean, std=data.std,
                         shuffle=True, seed=seed)
    if batches > len(loader):
        log.warning("quantize: %d calibration batches asked, the training set has %d of %d",
                    batches, len(loader), batch_size)
    for done, (inputs, _) in enumerate(loader, start=1):
        yield inputs
        if done >= batches:
            break


@torch.no_grad()
def calibrate(gm: torch.fx.GraphModule, data, batches: int, batch_size: int, seed: int) -> int:
    """Run `batches` shuffled, unaugmented training batches through the observers."""
    done = 0
    for inputs in calibration_batches(data, batches, batch_size, seed):
        gm(inputs)
        done += 1
    return done


def lean_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The converted graph with only the tensors it uses: convert_pt2e leaves the original fp32
    parameters attached though the graph reads the folded int8 copies, and exporting as is would
    ship both."""
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    return torch.fx.GraphModule({t: operator.attrgetter(t)(gm) for t in used}, gm.graph)


def graph_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the tensors the graph reads (int8 weights, scales, zero points, float biases)."""
    return tensor_bytes(operator.attrgetter(n.target)(gm) for n in gm.graph.nodes
                        if n.op == "get_attr")


def float_bytes(model: nn.Module) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


class Int8Model(nn.Module):
    """A converted pt2e graph (or an AOTInductor package runner) as an ordinary module. Exported
    graphs refuse train()/eval(); an int8 graph has no train mode, so the flag is kept and nothing
    is switched."""

    def __init__(self, gm: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.gm = gm

    def train(self, mode: bool = True) -> Int8Model:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


def plain_cpu() -> Hardware:
    """How int8 graphs are evaluated: CPU, fp32 inputs, contiguous layout, no autocast."""
    return Hardware(device="cpu", precision="fp32", channels_last=False)
