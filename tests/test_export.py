"""ONNX / OpenVINO export (effrun/export.py): files that load without effrun and give the torch
model's logits, written by the pipeline as recorded, cached stage outputs.

Tolerances (fp32; max |diff| of the logits over max(1, max |logit|)), measured on a 2-core
AVX-512 EPYC at batch 1, 5 and 64:
  trained ResNet-20 (this test's):  ONNX Runtime <= 4.5e-7, OpenVINO <= 5.2e-7
  random-weight ResNet-20:          ONNX Runtime ~3e-7,     OpenVINO ~3.5e-4
  ONNX Runtime tolerance 1e-4; OpenVINO 1e-3, room for its CPU plugin's own fp32 kernels, which
  differ by CPU and were 3.5e-4 off on the untrained net. OpenVINO is compiled with
  INFERENCE_PRECISION_HINT=f32: on a bf16-capable CPU its default is bf16 (measured 3-5e-3).
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from torch import nn

from effrun import export, pipeline
from effrun.artifacts import load_model
from effrun.errors import ConfigError, EffrunError
from effrun.keys import stage_config
from effrun.schema import validate

ORT_TOL, OV_TOL = 1e-4, 1e-3


def ort_logits(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ov_logits(path, x: np.ndarray) -> np.ndarray:
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0]


def assert_close(model: nn.Module, onnx_path, ov_path, size: int) -> None:
    """Batch 1 and 5 of size² images (the exports were traced at 2: the batch dim is
    dynamic, the image size is the data's)."""
    model.eval()
    for batch in (1, 5):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            ref = model(x).numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        for got, tol in ((ort_logits(onnx_path, x.numpy()), ORT_TOL),
                         (ov_logits(ov_path, x.numpy()), OV_TOL)):
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= tol * scale, (batch, np.abs(got - ref).max())


def test_pipeline_exports_load_without_effrun_match_torch_and_are_recorded(tmp_path):
    """The round trip, on the files the pipeline writes (one export: torch.export costs ~5 s
    per model on one thread here): a trained ResNet-20 exported at batch 2, loaded with
    onnxruntime / openvino only, run at batch 1 and 5 against the torch model from model.pt."""
    overrides = ["+experiment=smoke", "stages=[train]", "train.epochs=1",
                 "dataset.num_train=256", "export=[onnx,openvino]"]
    pipeline.run(compose_cfg(overrides), tmp_path / "a")
    sdir = tmp_path / "a" / "01_train"
    files = ["model_fp32.onnx", "model_openvino.bin", "model_openvino.xml"]
    assert not [p.name for p in sdir.iterdir() if p.name.startswith(".")], "no temp files"
    assert set(json.loads((sdir / "stage.json").read_text())["sha256"]) == {"model.pt", *files}
    assert json.loads((sdir / "metrics.json").read_text())["exports"] == {
        "onnx": "model_fp32.onnx", "openvino": "model_openvino.xml"}
    model = load_model(sdir / "model.pt")[0]
    assert model.__class__.__name__ == "BasicBlockResNet"
    assert_close(model, sdir / files[0], sdir / files[2],
                 validate(compose_cfg(overrides)).dataset.image_size)
    # The same config in another run dir is restored from the stage cache, exports included.
    pipeline.run(compose_cfg(overrides), tmp_path / "b")
    for name in files:
        assert (tmp_path / "b" / "01_train" / name).read_bytes() == (sdir / name).read_bytes()


def test_export_joins_the_float_stage_keys_only_when_set():
    base = ["+experiment=smoke", "compression/quantize=int8_ptq"]
    plain = validate(compose_cfg(base))
    both = validate(compose_cfg([*base, "export=[openvino,onnx]"]))
    assert "export" not in stage_config(plain, "train"), "keys made before it stay the same"
    for stage in ("train", "prune", "distill"):
        assert stage_config(both, stage)["export"] == ["onnx", "openvino"]
    assert "export" not in stage_config(both, "quantize")  # int8 is not exported


def one_line_config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unknown_format_is_one_line():
    msg = one_line_config_error(["+experiment=smoke", "export=[onnx,tflite]"])
    assert "'tflite'" in msg and "['onnx', 'openvino']" in msg


def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    msg = one_line_config_error(["+experiment=smoke", "export=[openvino]"])
    assert "pip install 'effrun[deploy]'" in msg and "openvino" in msg
    validate(compose_cfg(["+experiment=smoke", "export=[onnx]"]))  # onnx alone still works
    with pytest.raises(EffrunError, match=r"effrun\[deploy\]"):
        export.write_exports(nn.Linear(2, 2), tmp_path, ["openvino"], (2,))


def test_unexportable_model_warns_once_and_writes_nothing(tmp_path, caplog, capfd,
                                                          monkeypatch):
    """torch.onnx wraps the reason (for a real model: control flow on values, refused by
    torch.export in ~1 s after ~4 s of first-use imports; simulated here) in a generic error and
    prints graph dumps; the warning names the reason, the console stays clean."""
    def refuse(*args, **kwargs):
        print("class GraphModule(torch.nn.Module): ...")
        try:
            raise ValueError("Could not guard on data-dependent expression Eq(u0, 1)")
        except ValueError as e:
            raise RuntimeError("Failed to export the model with torch.export.") from e

    monkeypatch.setattr(torch.onnx, "export", refuse)
    with caplog.at_level(logging.WARNING, logger="effrun"):
        assert export.write_exports(nn.Linear(2, 2), tmp_path, ["onnx", "openvino"], (2,)) == {}
        assert export.write_exports(object(), tmp_path, ["onnx"], (3, 8, 8)) == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "Linear not exported (ValueError: Could not guard on data-dependent" in warnings[0]
    assert "not a torch nn.Module" in warnings[1]
    out, err = capfd.readouterr()
    assert "GraphModule" not in out + err, "torch's graph dumps are kept out of the console"
    assert not list(tmp_path.iterdir()), "no partial or temp files"
