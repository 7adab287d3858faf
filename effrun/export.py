"""Export a stage's float model to ONNX and OpenVINO IR, beside its model.pt (issue 12, item 1).

`export: [onnx, openvino]` (a root key, empty by default) makes every float model stage (train,
prune, distill; not quantize's int8 graph) write

    model_fp32.onnx                         ONNX, opset 18, dynamic batch dim "batch"
    model_openvino.xml + model_openvino.bin OpenVINO IR, converted from that ONNX graph

named `model_*` so the stage's sha256 record (stage.json) and the stage cache cover them. They
load without effrun: `onnxruntime.InferenceSession(path)`, `openvino.Core().read_model(path)`;
input "input" (N, C, H, W) float32, normalized as effrun's loader does; output "logits".

ONNX comes from torch's torch.export-based exporter (`dynamo=True`, the default and maintained
one since torch 2.9; the TorchScript exporter is deprecated: measured on a ResNet-20 here it
exports in 0.1-1 s against 3-7 s, with the same graph latency in ONNX Runtime and the same
logits). OpenVINO IR is converted from that ONNX file rather than from the torch module: the
IR is then the graph ONNX Runtime was checked on, conversion takes ~0.3 s instead of ~1.5 s
(openvino's torch frontend traces with the deprecated torch.jit.trace) and it keeps static
H and W. An `openvino` export without `onnx` converts from a temporary ONNX file.

The libraries are imported only here, only when asked for; missing, they are a one-line
error naming the `deploy` extra. A model that cannot be exported is one warning, not a failure:
its stage keeps its model.pt and records which exports were written.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import io
import logging
import re
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from torch import nn

from effrun.artifacts import atomic_path
from effrun.errors import EffrunError

log = logging.getLogger("effrun")

FORMATS = ("onnx", "openvino")
# Model stages whose float model is exported; quantize's int8 artifact is not (issue 12 item 2).
EXPORT_STAGES = ("train", "prune", "distill")
OPSET = 18  # the torch.export-based exporter's lowest supported opset
ONNX_FILE = "model_fp32.onnx"
OPENVINO_FILE = "model_openvino.xml"  # + model_openvino.bin
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# The Python modules each format needs (the `deploy` extra installs them).
NEEDS = {"onnx": ("onnx", "onnxscript"), "openvino": ("onnx", "onnxscript", "openvino")}
EXTRA_HINT = "pip install 'effrun[deploy]'"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def check_formats(formats: list[str]) -> None:
    """Config-time check: known format names, listed once, their libraries installed.
    Raises EffrunError (one line); imports nothing."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise EffrunError(f"export: unknown format {unknown[0]!r}; allowed: {list(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise EffrunError(f"export lists a format twice: {list(formats)}")
    for fmt in formats:
        missing = [m for m in NEEDS[fmt] if not _installed(m)]
        if missing:
            raise EffrunError(f"export={list(formats)} needs {', '.join(missing)}: "
                              f"{EXTRA_HINT}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EffrunError(f"export needs {module} ({e.__class__.__name__}): {EXTRA_HINT}") from None


def write_exports(model: nn.Module, stage_dir: Path, formats: list[str],
                  input_shape: tuple[int, ...]) -> dict[str, str]:
    """Export `model` in each of `formats` into `stage_dir`; returns {format: file name} of the
    files written. `input_shape` is one image (C, H, W). A model that cannot be exported gives
    one warning and whatever was written before the failure; a missing library is an
    EffrunError."""
    if not formats:
        return {}
    check_formats(list(formats))
    for module in sorted({m for f in formats for m in NEEDS[f]}):
        _import(module)  # a broken install fails here, with the extra's name
    stage_dir = Path(stage_dir)
    for stale in (ONNX_FILE, OPENVINO_FILE, Path(OPENVINO_FILE).with_suffix(".bin").name):
        (stage_dir / stale).unlink(missing_ok=True)  # an earlier attempt's: never recorded
    written: dict[str, str] = {}
    if not isinstance(model, nn.Module):
        log.warning("export skipped: the model is a %s, not a torch nn.Module",
                    type(model).__name__)
        return written
    try:
        float_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
        example = torch.randn(2, *input_shape)  # batch 2: a batch of 1 would be specialized
        with tempfile.TemporaryDirectory(dir=stage_dir, prefix=".export-") as tmp:
            onnx_path = (stage_dir / ONNX_FILE if "onnx" in formats
                         else Path(tmp) / ONNX_FILE)
            export_onnx(float_model, example, onnx_path)
            if "onnx" in formats:
                written["onnx"] = onnx_path.name
            if "openvino" in formats:
                xml = stage_dir / OPENVINO_FILE
                export_openvino(onnx_path, xml)
                written["openvino"] = xml.name
    except EffrunError:
        raise
    except Exception as e:  # the exporters raise many kinds; the stage still finishes
        log.warning("export: %s not exported (%s); exported: %s", type(model).__name__,
                    root_cause(e), sorted(written) or "none")
    return written


def root_cause(e: BaseException) -> str:
    """The innermost cause's first line: torch.onnx wraps the reason in a generic 'Failed to
    export the model with torch.export' error."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (ANSI.sub("", str(e)).strip().splitlines() or [""])[0][:300]
    return f"{e.__class__.__name__}: {first}"


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch dim, written atomically as one self-contained file."""
    batch = torch.export.Dim("batch")
    with atomic_path(path, suffix=".onnx") as tmp, quiet_torch():
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)


@contextmanager
def quiet_torch():
    """torch.export's and onnxscript's warnings, log lines and prints (a failed export dumps its
    graph): the one warning effrun gives says why."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), \
                redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_openvino(onnx_path: Path, xml: Path) -> None:
    """OpenVINO IR (.xml + .bin) from an ONNX file; both files land in place atomically
    (the .bin first, so a reader never finds an .xml without its weights)."""
    ov = _import("openvino")
    converted = ov.convert_model(str(onnx_path))
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".export-") as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(converted, str(tmp_xml), compress_to_fp16=False)  # fp32 weights
        for src in (tmp_xml.with_suffix(".bin"), tmp_xml):
            with atomic_path(xml.parent / src.name) as dst:
                src.replace(dst)
