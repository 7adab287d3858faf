"""The quantize stage on tiny models: int8 kernels, closeness to float, artifacts, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import compose_cfg, options, stage_ctx
from torch import nn

from effrun import pipeline
from effrun.artifacts import load_model
from effrun.compression.quantize import common
from effrun.compression.quantize.common import QuantizeError
from effrun.compression.quantize.int8_dynamic import Int8Dynamic
from effrun.compression.quantize.int8_ptq import Int8PTQ
from effrun.compression.quantize.int8_qat import Int8QAT
from effrun.data import BatchLoader
from effrun.schema import ConfigError, validate

# ResNet-8 of width 4: every int8 pattern of a ResNet (conv+relu, conv+add+relu, linear) in a
# graph small enough to compile in seconds.
# Test set = benchmark batch: int8 is compiled once for scoring and timing (one shape).
TINY = ["+experiment=smoke", "model.depth=8", "model.width=4", "dataset.num_train=512",
        "dataset.num_test=64", "train.epochs=1", "benchmark.batch_sizes=[64]"]


def images(data, n=64):
    loader = BatchLoader(data.test_x[:n], data.test_y[:n], n, mean=data.mean, std=data.std)
    return next(iter(loader))[0]


def make_ctx(tmp_path, overrides=()):
    """StageInputs of the quantize stage (a test model, so no model config to rebuild it)."""
    return stage_ctx(tmp_path, "quantize", ["+experiment=smoke", *overrides])[0]


def save_meta(inputs, result) -> dict:
    """The artifact metadata the pipeline hands to a saver."""
    return {"stage": "quantize", "model_config": {"_target_": "test"},
            "num_classes": inputs.data.num_classes, "deploy": result.deploy.to_meta(),
            "extra": result.artifact_meta}


def graph_ops(model) -> set[str]:
    return {str(n.target) for n in model.gm.graph.nodes if n.op == "call_function"}


def test_ptq_pipeline_fuses_int8_and_round_trips(tmp_path, smoke_run):
    """The smoke study's quantize stage: int8_ptq of the distilled ResNet-20."""
    run_dir = smoke_run[0]
    qdir = run_dir / "04_quantize"
    m = json.loads((qdir / "metrics.json").read_text())
    assert m["fused_int8_kernels"].get("qconv_pointwise", 0) >= 5, m["fused_int8_kernels"]
    assert "qlinear_pointwise" in m["fused_int8_kernels"]
    # Deployed size: int8 weights + per-channel scales; the .pt2 file also carries the graph.
    assert m["weight_bytes"] < 0.35 * m["float_weight_bytes"] < m["file_bytes"]
    assert m["calibration_batches"] == 16  # 1024 images / 64: all there are, with a warning

    int8, meta = load_model(qdir / "model.pt2")
    deploy = meta["deploy"]
    assert deploy["precision"] == "int8" and deploy["device"] == "cpu"
    assert deploy["compare_to"].endswith("03_distill/model.pt"), "its float parent"
    ops = graph_ops(int8)
    assert "quantized_decomposed.quantize_per_tensor.default" in ops
    assert "quantized_decomposed.dequantize_per_channel.default" in ops  # per-channel weights
    float_model, _ = load_model(run_dir / "03_distill" / "model.pt")
    data = validate(compose_cfg(["+experiment=smoke"])).dataset.load(seed=0)
    x = images(data)
    with torch.no_grad():
        ref, out = float_model.eval()(x), int8(x)
    assert torch.allclose(out, ref, atol=0.1 * ref.abs().max().item()), (out - ref).abs().max()
    # A student a single epoch old has close logits: int8 rounding flips some top-1s (87.5% of
    # 64 kept on an AVX2 EPYC, where activations get 7 bits).
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8

    # The .pt2 runs with plain torch (no effrun, no torchao) and predicts the same; torch's
    # own module that defines the quantize/dequantize ops is all it needs.
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch, torch.ao.quantization.fx._decomposed; "
            "ep = torch.export.load(sys.argv[1]); "
            "x = torch.load(sys.argv[2]); torch.save(ep.module()(x), sys.argv[3]); "
            "assert not any(m.startswith(('effrun', 'torchao')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(qdir / "model.pt2"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "y.pt"), out)

    bench = json.loads((run_dir / "05_benchmark" / "metrics.json").read_text())["models"]
    q = next(b for b in bench if b["stage"] == "quantize")
    assert q["kernels_found"] and q["weight_bytes"] == m["weight_bytes"]
    points = q["vs_reference"]["points"]
    assert {p["mode"] for p in points} == {"compiled"}, "int8 is judged as deployed: compiled"
    assert all(p["ratio"] > 0 for p in points)
    assert isinstance(q["flags"], list)


def test_qat_trains_fake_quant_then_converts(tmp_path):
    # No BatchNorm: torchao's conv+BN folding traces ~150 patterns (minutes on a slow CPU); the
    # ResNet path with BN runs in test_qat_pipeline_resnet (slow).
    ctx = make_ctx(tmp_path, ["dataset.num_train=256", "dataset.num_test=128",
                              "train.batch_size=64"])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    method = Int8QAT(epochs=1, lr=0.01)
    result = method(model, ctx)
    int8 = result.model
    assert len(result.metrics["qat"]["history"]) == 1 and (tmp_path / "qat.pt").is_file()
    assert result.metrics["fused_int8_kernels"].get("qconv_pointwise", 0) >= 2
    assert "quantized_decomposed.dequantize_per_channel.default" in graph_ops(int8)
    path = result.save(tmp_path, save_meta(ctx, result))
    reloaded, _ = load_model(path)
    x = torch.randn(3, 3, *ctx.data.image_size)  # the exported graph's image size
    with torch.no_grad():
        assert torch.equal(reloaded(x), int8(x))


@pytest.mark.slow
def test_qat_pipeline_resnet(tmp_path):
    pipeline.run(compose_cfg([*TINY, "compression/quantize=int8_qat", "stages=[train,quantize]",
                              "compression.quantize.epochs=1"]), tmp_path)
    m = json.loads((tmp_path / "04_quantize" / "metrics.json").read_text())
    assert len(m["qat"]["history"]) == 1 and m["fused_int8_kernels"].get("qconv_pointwise", 0) >= 5
    int8, _ = load_model(tmp_path / "04_quantize" / "model.pt2")
    assert not any("batch_norm" in op for op in graph_ops(int8)), "BN folded into the convs"


class Outlier(nn.Module):
    """Appends an always-zero feature; a huge weight on it changes nothing in float but ruins
    per-channel int8 weights of its layer (the scale follows the outlier)."""

    def forward(self, x):
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def test_dynamic_with_fallback_keeps_the_sensitive_layer_float(tmp_path):
    ctx = make_ctx(tmp_path, ["dataset.num_train=1000", "dataset.num_test=500",
                              "dataset.image_size=8", "augmentation=none"])
    model = nn.Sequential(nn.Flatten(), Outlier(), nn.Linear(193, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    ctx.fit(model, epochs=4)
    with torch.no_grad():
        model[2].weight[:, -1] = 1e4
    method = Int8Dynamic(max_accuracy_drop=0.03, fallback_eval_images=500)
    result = method(model, ctx)
    int8, metrics = result.model, result.metrics
    report = metrics["fallback"]
    first, last = report["steps"][0], report["steps"][-1]
    assert report["float_accuracy"] > 0.3 and first["drop"] > 0.1, report
    assert report["sensitivity"]["2"] > report["sensitivity"]["4"]
    assert last["float_layers"] == ["2"] and report["within_tolerance"]
    assert metrics["float_layers"] == ["2"] and metrics["accuracy_drop"] <= 0.03
    assert metrics["fused_int8_kernels"], "the remaining Linear runs as a fused int8 kernel"

    path = result.save(tmp_path, save_meta(ctx, result))
    reloaded, meta = load_model(path)
    assert meta["extra"]["float_layers"] == ["2"]
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x).argmax(1), int8(x).argmax(1))
        assert torch.allclose(reloaded(x), model(x), atol=0.05 * model(x).abs().max().item())


@pytest.mark.parametrize("override, message", [
    ("compression.quantize.calibration_batches=0",
     "compression.quantize.calibration_batches must be >= 1, got 0"),
    ("compression.quantize.max_accuracy_drop=3", "compression.quantize.max_accuracy_drop"),
])
def test_bad_config_is_one_line_before_work(override, message):
    cfg = compose_cfg(["+experiment=smoke", "compression/quantize=int8_ptq", override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cfg)


def test_preflight_refuses_bad_input_before_work(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path, ["dataset.num_train=64", "dataset.num_test=16"])
    resnet = validate(compose_cfg(TINY)).model.build(num_classes=10)
    with pytest.raises(QuantizeError, match="no Conv2d/Linear layer"):
        Int8PTQ()(nn.Sequential(nn.Conv3d(3, 4, 1)), ctx)
    with pytest.raises(QuantizeError, match="float_layers: no layer named 'nope'"):
        Int8PTQ(float_layers=["nope"])(resnet, ctx)
    with pytest.raises(QuantizeError, match="int8_dynamic|no Linear layer"):
        Int8Dynamic()(nn.Sequential(nn.Conv2d(3, 4, 1)), ctx)
    monkeypatch.setattr(common, "find_compiler", lambda: None)
    with pytest.raises(QuantizeError, match="C\\+\\+ compiler"):
        Int8PTQ()(resnet, ctx)
    monkeypatch.undo()
    # An int8 graph (here: converted, not compiled) is refused as a parent.
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = common.export_model(resnet.eval(), torch.randn(2, 3, 32, 32))
    prepared = prepare_pt2e(gm, common.x86_quantizer())
    prepared(torch.randn(2, 3, 32, 32))
    with pytest.raises(QuantizeError, match="already quantized"):
        Int8PTQ()(common.Int8Model(convert_pt2e(prepared)), ctx)
    assert not list(tmp_path.iterdir()), "nothing was written"


def test_presets_compose():
    assert {"int8_ptq", "int8_qat", "int8_dynamic"} <= set(options("compression/quantize"))
    for name, method in (("cifar10_int8", "Int8PTQ"), ("cifar10_qat", "Int8QAT")):
        r = validate(compose_cfg([f"+experiment={name}"]))
        assert type(r.compression["quantize"]).__name__ == method
        assert r.run.stages == ["train", "quantize", "benchmark"]
        assert r.model.depth == 20 and r.hardware.device == "cpu"
        baseline = validate(compose_cfg(["+experiment=cifar10_baseline"]))
        assert r.run.train == baseline.run.train and r.optimizer == baseline.optimizer
    for method in ("int8_ptq", "int8_qat", "int8_dynamic"):
        validate(compose_cfg(["+experiment=smoke", f"compression/quantize={method}",
                              "stages=[train,quantize]"]))


@pytest.mark.slow
def test_aoti_package_loads_without_compiling(tmp_path):
    pipeline.run(compose_cfg([*TINY, "compression/quantize=int8_ptq", "stages=[train,quantize]",
                              "compression.quantize.aot_package=true"]), tmp_path)
    # An AOTInductor package runs a shared library from inside the file: effrun loads one only
    # when trusted (it wrote it in this run dir, or trust_artifact=true).
    aoti, meta = load_model(tmp_path / "04_quantize" / "model_aoti.pt2", trusted=True)
    program, _ = load_model(tmp_path / "04_quantize" / "model.pt2")
    assert meta["aoti_package"] and "aoti" in meta
    size = validate(compose_cfg(TINY)).dataset.image_size  # what the graphs were exported at
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(aoti(x).argmax(1), program(x).argmax(1))
