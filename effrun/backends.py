"""Inference backends a model is deployed on: torch, ONNX Runtime and OpenVINO (issue 12).

`load(path, backend, threads)` turns a model file into a `BackendModel`: an nn.Module that
takes a float32 NCHW torch tensor (normalized as effrun's loader does) and returns the logits as
a torch tensor. effrun's one evaluation entry and one latency timer then score and time every
backend the same way: the same inputs, the same clock, the same percentiles.

Threads: every runtime gets the same intra-op thread count and runs one request at a time
(ONNX Runtime: sequential execution, 1 inter-op thread; OpenVINO: 1 stream, the LATENCY hint),
as torch does under `set_threads`. OpenVINO runs float ops in f32 (INFERENCE_PRECISION_HINT):
left to itself it picks bf16 on CPUs with AVX-512 BF16 or AMX, which would time a different
numeric format than the row says; int8 layers stay int8 either way.

The runtimes are imported only here and only when a backend is asked for; missing, they are a
one-line EffrunError naming the `deploy` extra.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effrun.errors import EffrunError

log = logging.getLogger("effrun")

BACKENDS = ("torch", "onnxruntime", "openvino")
# The Python module each non-torch backend needs (the `deploy` extra installs them).
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
EXTRA_HINT = "pip install 'effrun[deploy]'"


def check_backends(backends: list[str]) -> None:
    """Config-time check: known names, each once, their runtimes installed (one line)."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise EffrunError(f"benchmark.backends: unknown backend {unknown[0]!r}; "
                          f"allowed: {list(BACKENDS)}")
    if len(set(backends)) != len(backends) or not backends:
        raise EffrunError(f"benchmark.backends must list each backend once: {list(backends)}")
    for backend in backends:
        if backend in MODULES and importlib.util.find_spec(MODULES[backend]) is None:
            raise EffrunError(f"benchmark.backends={list(backends)} needs {MODULES[backend]}: "
                              f"{EXTRA_HINT}")


def runtime(backend: str):
    """The runtime module of a non-torch backend, or a one-line error naming the extra."""
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError as e:
        raise EffrunError(f"backend {backend} needs {MODULES[backend]} "
                          f"({e.__class__.__name__}): {EXTRA_HINT}") from None


class BackendModel(nn.Module):
    """A compiled model of another runtime, called like a torch module on CPU tensors."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], backend: str, threads: int,
                 path: Path):
        super().__init__()
        self.run = run
        self.backend = backend
        self.threads = threads
        self.path = Path(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self.run(array)))

    def extra_repr(self) -> str:
        return f"backend={self.backend}, threads={self.threads}, path={self.path.name}"


def load(path: Path, backend: str, threads: int) -> BackendModel:
    """A model file (.onnx for onnxruntime; .onnx or OpenVINO IR .xml for openvino) ready to run
    with `threads` intra-op threads."""
    if backend == "onnxruntime":
        return onnxruntime_model(Path(path), threads)
    if backend == "openvino":
        return openvino_model(Path(path), threads)
    raise EffrunError(f"backend {backend!r} does not load model files; allowed: "
                      f"onnxruntime, openvino")


def onnxruntime_model(path: Path, threads: int) -> BackendModel:
    ort = runtime("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are about the graph, not the run
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types, one per failure kind
        raise EffrunError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None
    name = session.get_inputs()[0].name
    return BackendModel(lambda array: session.run(None, {name: array})[0], "onnxruntime",
                        threads, path)


def openvino_model(path: Path, threads: int) -> BackendModel:
    ov = runtime("openvino")
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32"}
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as e:
        raise EffrunError(f"openvino cannot compile {path}: {_first_line(e)}") from None
    request = compiled.create_infer_request()

    def run(array: np.ndarray) -> np.ndarray:
        request.infer({0: array})
        return request.get_output_tensor(0).data.copy()  # the buffer is reused by the next call

    return BackendModel(run, "openvino", threads, path)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0][:300]}" if lines else e.__class__.__name__
