"""int8 artifacts of other runtimes: an ONNX file (ONNX Runtime) and an OpenVINO IR (.xml+.bin).

Both are self-describing like effrun's .pt and .pt2: the metadata the pipeline hands a saver
(stage, model_config, num_classes, deploy, extra) rides inside the model file as JSON
- ONNX: `metadata_props` entry "effrun.json" (`onnx.load(path).metadata_props`);
- OpenVINO IR: rt_info ["effrun", "json"] (`core.read_model(xml).get_rt_info(["effrun",
  "json"]).astype(str)`),
and both load without effrun: `onnxruntime.InferenceSession(path)` /
`openvino.Core().read_model(xml)`, input "input" (N, C, H, W) float32 normalized as effrun's
loader does, output "logits". The loaders registered in effrun.artifacts (".onnx", ".xml")
return an effrun.backends.BackendModel (torch tensors in and out) with torch's current thread
count. Neither format holds code, so an untrusted file is read as it is.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from effrun import backends
from effrun.artifacts import atomic_path
from effrun.errors import EffrunError
from effrun.export import export_onnx, root_cause
from effrun.stage import Deployment

META_KEY = "effrun.json"  # ONNX metadata_props key
OV_META_PATH = ["effrun", "json"]  # OpenVINO rt_info path
EXTRA_HINT = "pip install 'effrun[deploy]'"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")


def need(module: str, method: str):
    """Import a runtime library a method needs, or one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EffrunError(f"{method} needs {module} ({e.__class__.__name__}): "
                          f"{EXTRA_HINT}") from None


def export_parent(model: nn.Module, example: torch.Tensor, path: Path, method: str) -> Path:
    """The float parent as ONNX (effrun.export: opset 18, dynamic batch, "input" -> "logits");
    a model the exporter cannot capture is one EffrunError line."""
    try:
        export_onnx(model, example, path)
    except EffrunError:
        raise
    except Exception as e:  # the exporters raise many kinds; the root cause names the construct
        raise EffrunError(f"{method}: the float parent cannot be exported to ONNX, so it cannot "
                          f"be quantized for this backend ({root_cause(e)})") from None
    return path


def numpy_batches(batches: Iterable[torch.Tensor]) -> list[np.ndarray]:
    return [b.to(torch.float32).contiguous().numpy() for b in batches]


# --- ONNX ------------------------------------------------------------------------------------

def save_onnx(model, path: Path, meta: dict) -> Path:
    """Write an onnx.ModelProto with `meta` in its metadata_props, atomically."""
    onnx = need("onnx", "saving an ONNX artifact")
    for prop in [p for p in model.metadata_props if p.key == META_KEY]:
        model.metadata_props.remove(prop)
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta, default=str))
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def onnx_initializer_bytes(model) -> int:
    """Bytes of the tensors an ONNX graph holds (int8 weights, scales, zero points, biases)."""
    from onnx import numpy_helper
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def read_onnx_meta(path: Path) -> dict:
    onnx = need("onnx", "reading an ONNX artifact")
    try:  # the graph without its weights: only the metadata and the op types are read
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EffrunError(f"cannot read {path} as an ONNX model: {root_cause(e)}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY in props:
        return json.loads(props[META_KEY])
    int8 = any(n.op_type in QDQ_OPS for n in model.graph.node)
    return _minimal_meta("int8" if int8 else "fp32", "onnxruntime")


def load_onnx(path: Path, *, trusted: bool = False) -> tuple[nn.Module, dict]:
    """ARTIFACT_LOADERS['.onnx']: an ONNX Runtime session as a torch module, and its metadata.
    (`trusted` is ignored: an ONNX file holds no code.)"""
    path = Path(path)
    if not path.is_file():
        raise EffrunError(f"model artifact not found: {path}")
    meta = read_onnx_meta(path)
    return backends.load(path, "onnxruntime", torch.get_num_threads()), meta


def _minimal_meta(precision: str, backend: str) -> dict:
    """The metadata of a model file effrun did not write: it runs as it is on its runtime."""
    return {"deploy": Deployment(precision=precision, backend=backend, device="cpu").to_meta()}


# --- OpenVINO IR -----------------------------------------------------------------------------

def save_openvino(ov_model, xml: Path, meta: dict) -> Path:
    """Write an ov.Model as `xml` + its .bin with `meta` in rt_info; both land atomically, the
    .bin first (a reader never finds an .xml without its weights), as effrun.export does."""
    ov = need("openvino", "saving an OpenVINO artifact")
    ov_model.set_rt_info(json.dumps(meta, default=str), OV_META_PATH)
    xml = Path(xml)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".save-") as tmp:
        tmp_xml = Path(tmp) / xml.name
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        for src in (tmp_xml.with_suffix(".bin"), tmp_xml):
            with atomic_path(xml.parent / src.name) as dst:
                src.replace(dst)
    return xml


def openvino_float_layers(ov_model) -> list[str]:
    """Convolution / MatMul ops whose weights are not quantized (no FakeQuantize and no int8
    constant upstream of their weight input): the layers an OpenVINO model runs in float."""
    names = []
    for op in ov_model.get_ops():
        if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul") and \
                not _quantized_input(op.input_value(1).get_node()):
            names.append(op.get_friendly_name())
    return names


def _quantized_input(node, depth: int = 6) -> bool:
    """True when the weight path feeding a layer holds a FakeQuantize or an int8 constant
    (NNCF's compressed form: i8 Constant -> Convert -> Subtract -> Multiply)."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_element_type().get_type_name() in ("i8", "u8")
    return depth > 0 and any(_quantized_input(v.get_node(), depth - 1)
                             for v in node.input_values())


def read_openvino_meta(xml: Path, ov_model=None) -> dict:
    ov = need("openvino", "reading an OpenVINO artifact")
    if ov_model is None:
        try:
            ov_model = ov.Core().read_model(str(xml))
        except Exception as e:
            raise EffrunError(f"cannot read {xml} as an OpenVINO IR: {root_cause(e)}") from None
    if ov_model.has_rt_info(OV_META_PATH):
        return json.loads(ov_model.get_rt_info(OV_META_PATH).astype(str))
    int8 = any(op.get_type_name() in ("FakeQuantize", "FakeConvert")
               or (op.get_type_name() == "Constant"
                   and op.get_element_type().get_type_name() in ("i8", "u8"))
               for op in ov_model.get_ops())
    return _minimal_meta("int8" if int8 else "fp32", "openvino")


def load_openvino_ir(path: Path, *, trusted: bool = False) -> tuple[nn.Module, dict]:
    """ARTIFACT_LOADERS['.xml']: an OpenVINO IR compiled for the CPU as a torch module, and its
    metadata. (`trusted` is ignored: an IR holds no code.)"""
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise EffrunError(f"OpenVINO IR not found: {path} and its .bin are both needed")
    meta = read_openvino_meta(path)
    return backends.load(path, "openvino", torch.get_num_threads()), meta
