"""int8_onnxruntime and int8_openvino on tiny models: artifacts, metadata, fallback, calibration."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import compose_cfg, run_cli, stage_ctx
from torch import nn

from effrun import pipeline
from effrun.artifacts import load_model
from effrun.compression.quantize import common, int8_onnxruntime
from effrun.compression.quantize.int8_onnxruntime import CalibrationImages, Int8OnnxRuntime
from effrun.compression.quantize.int8_openvino import Int8OpenVINO
from effrun.data import BatchLoader
from effrun.errors import EffrunError
from effrun.schema import ConfigError, validate

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

# ResNet-8 of width 4 on 256 synthetic 16x16 images, 2 x 32 calibration images.
TINY = ["+experiment=smoke", "model.depth=8", "model.width=4", "dataset.num_train=256",
        "dataset.num_test=64", "dataset.image_size=16", "train.epochs=1",
        "compression.quantize.calibration_batches=2",
        "compression.quantize.calibration_batch_size=32"]
ARTIFACTS = {"int8_onnxruntime": "model_int8.onnx", "int8_openvino": "model_int8_openvino.xml"}
METHODS = {"int8_onnxruntime": Int8OnnxRuntime, "int8_openvino": Int8OpenVINO}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(quantize stage inputs, a ResNet-8 trained one epoch on the tiny data)."""
    ctx, _, model = stage_ctx(tmp_path_factory.mktemp("tiny"), "quantize",
                              [*TINY, "compression/quantize=int8_ptq"])
    ctx.fit(model, epochs=1)
    return ctx, model.eval()


def sample_images(data, n: int = 64) -> torch.Tensor:
    loader = BatchLoader(data.test_x[:n], data.test_y[:n], n, mean=data.mean, std=data.std)
    return next(iter(loader))[0]


def assert_int8_follows_float(out: torch.Tensor, ref: torch.Tensor) -> None:
    """int8 rounding of a barely trained model: logits on average within 3% of their spread,
    none off by more than 30%, top-1 mostly the same. A mean, not a max, bounds the typical
    error: without VNNI (AVX2 only) OpenVINO's int8 kernels put single logits 16% of the spread
    away (measured on Zen 3; the mean stays 0.3%), while a broken conversion is off everywhere."""
    spread = (ref.max() - ref.min()).item()
    error = (out - ref).abs()
    assert error.mean() <= 0.03 * spread and error.max() <= 0.3 * spread, (
        error.mean() / spread, error.max() / spread)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8


def plain_runtime_logits(path, x: torch.Tensor) -> np.ndarray:
    """The artifact run by its runtime's own API reading the file (no effrun code)."""
    if path.suffix == ".onnx":
        import onnxruntime as ort
        return ort.InferenceSession(str(path)).run(["logits"], {"input": x.numpy()})[0]
    import openvino as ov
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x.numpy())[0]


# int8_openvino runs in its own process here (test_openvino_round_trips_through_the_cli): in
# a pytest worker that had run NNCF's quantization, a later DataLoader worker fork got the
# worker killed by SIGSEGV under output capture (not with -s; not reproduced outside pytest).
@pytest.mark.parametrize("method", ["int8_onnxruntime"])
def test_artifact_round_trips_and_runs_on_the_plain_runtime(tiny, method, tmp_path):
    ctx, model = tiny
    result = METHODS[method](calibration_batches=2, calibration_batch_size=32)(model, ctx)
    m = result.metrics
    assert m["calibration_images"] == 64 and m["float_layers"] == []
    assert result.figures.weight_bytes < 0.45 * m["float_weight_bytes"], "int8 weights"
    assert abs(m["accuracy_drop"]) <= 0.1
    meta = {"stage": "quantize", "model_config": {"_target_": "test"},
            "num_classes": ctx.data.num_classes, "deploy": result.deploy.to_meta(),
            "extra": result.artifact_meta}
    artifact = result.save(tmp_path, meta)
    assert artifact.name == ARTIFACTS[method]

    int8, meta = load_model(artifact)
    backend = method.removeprefix("int8_")
    assert meta["stage"] == "quantize" and meta["num_classes"] == 10
    assert meta["deploy"]["backend"] == backend and meta["deploy"]["precision"] == "int8"
    assert meta["deploy"]["device"] == "cpu"
    assert meta["extra"]["method"] == type(METHODS[method]()).__name__
    assert int8.backend == backend
    x = sample_images(ctx.data)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    assert_int8_follows_float(out, ref)
    assert torch.allclose(result.model(x), out, atol=1e-5), "scored as it is saved"
    assert np.allclose(plain_runtime_logits(artifact, x), out.numpy(), atol=1e-4)
    if method == "int8_onnxruntime":
        check_foreign_onnx(artifact, tmp_path / "foreign.onnx", x)


def test_openvino_round_trips_through_the_cli(tmp_path):
    """effrun stages=[train,quantize] with int8_openvino; the IR and its .bin are recorded, load
    with their metadata, give the float model's top-1 and run on plain OpenVINO."""
    run = run_cli([*TINY, "compression/quantize=int8_openvino", "stages=[train,quantize]",
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    qdir = tmp_path / "run" / "04_quantize"
    assert set(json.loads((qdir / "stage.json").read_text())["sha256"]) == {
        "model_int8_openvino.xml", "model_int8_openvino.bin"}, "both files recorded (cached)"
    m = json.loads((qdir / "metrics.json").read_text())
    assert m["calibration_images"] == 64 and m["float_layers"] == []
    assert m["weight_bytes"] < 0.45 * m["float_weight_bytes"] and abs(m["accuracy_drop"]) <= 0.1
    int8, meta = load_model(qdir / "model_int8_openvino.xml")
    assert meta["stage"] == "quantize" and meta["num_classes"] == 10
    assert (meta["deploy"]["backend"], meta["deploy"]["precision"]) == ("openvino", "int8")
    assert meta["deploy"]["compare_to"].endswith("01_train/model.pt"), "its float parent"
    assert meta["extra"]["method"] == "Int8OpenVINO" and int8.backend == "openvino"
    model = load_model(tmp_path / "run" / "01_train" / "model.pt")[0].eval()
    data = validate(compose_cfg(TINY)).dataset.load(seed=0)
    x = sample_images(data)
    with torch.no_grad():
        ref, out = model(x), int8(x)
    assert_int8_follows_float(out, ref)
    # Same numbers up to the kernels' layout: without VNNI (AVX2), with two threads, OpenVINO's
    # int8 results on its own defaults and on effrun's (one stream) differed by up to 0.02.
    spread = (ref.max() - ref.min()).item()
    assert np.allclose(plain_runtime_logits(qdir / "model_int8_openvino.xml", x), out.numpy(),
                       atol=max(1e-4, 0.02 * spread))


def check_foreign_onnx(artifact, foreign, x: torch.Tensor) -> None:
    """An .onnx without effrun's metadata loads as an int8 ONNX Runtime model."""
    import onnx

    proto = onnx.load(str(artifact))
    assert json.loads({p.key: p.value for p in proto.metadata_props}["effrun.json"])["stage"] \
        == "quantize"
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    int8, meta = load_model(foreign)
    assert meta["deploy"]["backend"] == "onnxruntime" and meta["deploy"]["precision"] == "int8"
    assert int8(x[:4]).shape == (4, 10)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ARTIFACTS))
def test_pipeline_train_then_quantize(method, tmp_path):
    pipeline.run(compose_cfg([*TINY, f"compression/quantize={method}",
                              "stages=[train,quantize]"]), tmp_path)
    qdir = tmp_path / "04_quantize"
    record = json.loads((qdir / "stage.json").read_text())
    assert record["artifact"] == ARTIFACTS[method]
    names = {ARTIFACTS[method]} | ({"model_int8_openvino.bin"} if method == "int8_openvino"
                                   else set())
    assert set(record["sha256"]) == names, "every file of the artifact is recorded (and cached)"
    m = json.loads((qdir / "metrics.json").read_text())
    assert m["weight_bytes"] < 0.45 * m["float_weight_bytes"] and m["file_bytes"] > 0
    _, meta = load_model(qdir / ARTIFACTS[method])
    assert meta["deploy"]["compare_to"].endswith("01_train/model.pt"), "its float parent"
    assert meta["model_config"]["depth"] == 8


class Outlier(nn.Module):
    """Appends a zero input feature: a huge weight on it inflates the per-channel int8 scales of
    its layer without changing the float model, so int8 loses accuracy there alone."""

    def forward(self, x):
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    """(stage inputs, a trained MLP whose first Linear int8 ruins)."""
    ctx = stage_ctx(tmp_path_factory.mktemp("sensitive"), "quantize", [
        "+experiment=smoke", "dataset.num_train=1000", "dataset.num_test=500",
        "dataset.image_size=8", "augmentation=none"])[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), Outlier(), nn.Linear(193, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    ctx.fit(model, epochs=4)
    with torch.no_grad():
        model[2].weight[:, -1] = 1e4
    return ctx, model.eval()


@pytest.mark.slow
def test_onnxruntime_fallback_keeps_the_sensitive_node_float(sensitive, monkeypatch):
    ctx, model = sensitive
    calls = []

    def recorded(*args):
        calls.append(args[1:])
        return common.calibration_batches(*args)

    monkeypatch.setattr(int8_onnxruntime, "calibration_batches", recorded)
    result = Int8OnnxRuntime(calibration_batches=4, calibration_batch_size=50,
                             max_accuracy_drop=0.03, fallback_eval_images=500)(model, ctx)
    report = result.metrics["fallback"]
    assert report["steps"][0]["drop"] > 0.1, report
    # The first Linear (the outlier's) is the ONNX node "node_linear"; it alone goes float.
    assert report["sensitivity"]["node_linear"] > report["sensitivity"]["node_linear_1"]
    assert report["float_layers"] == ["node_linear"] and report["within_tolerance"], report
    assert result.metrics["float_layers"] == ["node_linear"]
    assert result.metrics["accuracy_drop"] <= 0.03
    # Calibrated once (the ranges are reused for every candidate), on int8_ptq's images.
    assert calls == [(4, 50, ctx.seed)]


@pytest.mark.slow
def test_openvino_accuracy_control_keeps_the_sensitive_layer_float(sensitive):
    ctx, model = sensitive
    result = Int8OpenVINO(calibration_batches=4, calibration_batch_size=50,
                          max_accuracy_drop=0.03, fallback_eval_images=500)(model, ctx)
    metrics = result.metrics
    assert metrics["fallback"]["split"] == "test" and metrics["fallback"]["eval_images"] == 500
    # NNCF reverted the outlier's Linear (OpenVINO op "node_linear/WithoutBiases") alone.
    float_layers = metrics["float_layers"]
    assert len(float_layers) == 1 and float_layers[0].startswith("node_linear/"), metrics
    assert metrics["accuracy_drop"] <= 0.03, metrics


def test_calibration_images_are_int8_ptqs(tiny):
    """The ONNX Runtime reader gets what common.calibrate feeds int8_ptq."""
    data, seed = tiny[0].data, 3
    seen = []
    common.calibrate(lambda x: seen.append(x.numpy()), data, 3, 16, seed)
    reader = CalibrationImages(common.calibration_batches(data, 3, 16, seed))
    fed = list(iter(reader.get_next, None))
    assert len(fed) == len(seen) == 3
    assert all(np.array_equal(f["input"], s) for f, s in zip(fed, seen, strict=True))


def test_parent_that_cannot_export_is_one_line(tiny):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 10)

        def forward(self, x):
            x = x.flatten(1)
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    # Both methods export through backend_artifact.export_parent; one is enough here.
    with pytest.raises(EffrunError, match="cannot be exported to ONNX") as err:
        Int8OnnxRuntime()(DataDependent(), tiny[0])
    assert "\n" not in str(err.value)


def test_missing_library_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(EffrunError, match=r"needs onnxruntime .*effrun\[deploy\]"):
        Int8OnnxRuntime()(nn.Linear(1, 1), tiny[0])
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(EffrunError, match=r"needs nncf .*effrun\[deploy\]"):
        Int8OpenVINO()(nn.Linear(1, 1), tiny[0])


@pytest.mark.parametrize("cls, values, message", [
    (Int8OnnxRuntime, {"activation_type": "int4"}, "activation_type"),
    (Int8OnnxRuntime, {"calibrate_method": "mse"}, "calibrate_method"),
    (Int8OnnxRuntime, {"max_accuracy_drop": 2}, "max_accuracy_drop"),
    (Int8OnnxRuntime, {"calibration_batches": 0}, "calibration_batches"),
    (Int8OpenVINO, {"preset": "fast"}, "preset"),
    (Int8OpenVINO, {"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
])
def test_config_checks(cls, values, message):
    with pytest.raises(ValueError, match=message):
        cls(**values)


def test_config_error_names_the_key():
    with pytest.raises(ConfigError, match="compression.quantize.preset"):
        validate(compose_cfg(["+experiment=smoke", "compression/quantize=int8_openvino",
                              "compression.quantize.preset=fast"]))
