"""The benchmark across runtimes (issue 12, item 3): every model on torch, ONNX Runtime and
OpenVINO in one process, timed interleaved with the same threads, one summary record per
(stage, runtime), the "not faster" check judging the deployed form, the fastest deployable named.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_cfg

from effrun import pipeline
from effrun.benchmark import OnRuntimes, record_point
from effrun.errors import ConfigError
from effrun.measure import measure_interleaved
from effrun.schema import validate
from effrun.summary import fastest_deployable, headline


def test_interleaved_rounds_alternate_and_time_every_form():
    calls: list[str] = []

    def form(name):
        return lambda x: calls.append(name)

    timed = measure_interleaved({"a": form("a"), "b": form("b")}, torch.zeros(3, 2),
                                warmup=1, iters=6, rounds=3)
    assert calls[:2] == ["a", "b"], "warm-up: each once"
    assert calls[2:] == ["a", "a", "b", "b"] * 3, "3 rounds of 6 / 3 calls each, in turn"
    assert timed["a"]["iters"] == timed["b"]["iters"] == 6
    assert timed["a"]["batch_size"] == 3
    assert timed["a"]["latency_ms_p50"] <= timed["a"]["latency_ms_p99"]


def fake_timed(model_ms: dict, ref_ms: dict) -> dict:
    def figures(ms):
        return {"latency_ms_p50": ms, "latency_ms_p90": ms, "latency_ms_p99": ms,
                "throughput_ips": 1000 / ms, "batch_size": 1, "iters": 1}
    return {**{("model", *k): figures(v) for k, v in model_ms.items()},
            **{("reference", *k): figures(v) for k, v in ref_ms.items()}}


def test_not_faster_is_judged_on_the_deployed_form_only():
    """An eager graph slower than its reference is not what a user deploys: no flag. The
    compiled form and a runtime's own session are."""
    target = OnRuntimes(torch=SimpleNamespace(deployed_mode="compiled"), files={})
    out = {"latency": [], "flags": [], "vs_reference": {"artifact": "p/model.pt", "points": []}}
    timed = fake_timed({("torch", "eager"): 2.6, ("torch", "compiled"): 0.5,
                        ("onnxruntime", "onnxruntime"): 1.2},
                       {("torch", "eager"): 1.0, ("torch", "compiled"): 1.0,
                        ("onnxruntime", "onnxruntime"): 1.0})
    record_point(target, timed, threads=1, out=out)
    assert len(out["latency"]) == 3 and len(out["vs_reference"]["points"]) == 3
    assert {p["backend"] for p in out["latency"]} == {"torch", "onnxruntime"}
    assert len(out["flags"]) == 1 and "on onnxruntime" in out["flags"][0], out["flags"]
    assert "ratio 1.20" in out["flags"][0]


def row(stage, backend, accuracy, bs1, bs64):
    return {"stage": stage, "backend": backend, "accuracy": accuracy, "bs_max": 64,
            "latency_ms_p50_bs1": bs1, "latency_ms_p50_bs_max": bs64}


def test_fastest_deployable_within_tolerance():
    rows = [row("train", "torch", 0.700, 5.0, 100.0), row("train", "openvino", 0.700, 1.8, 90.0),
            row("prune", "openvino", 0.650, 0.9, 40.0),  # fast but 5 points down: not eligible
            row("quantize", "openvino", 0.697, 1.0, 33.0),
            row("quantize", "onnxruntime", 0.690, 0.8, 50.0)]  # 1 point down: out at 0.005
    fastest = fastest_deployable(rows, tolerance=0.005)
    assert fastest["best_accuracy"] == 0.700
    assert (fastest["batch_1"]["stage"], fastest["batch_1"]["backend"]) == ("quantize", "openvino")
    assert fastest["batch_max"]["latency_ms_p50"] == 33.0
    assert fastest_deployable(rows, tolerance=0.02)["batch_1"]["backend"] == "onnxruntime"
    assert headline(rows)["stage"] == "quantize" and headline(rows)["latency_ms_p50_bs1"] == 1.0


def test_unknown_or_missing_backend_is_one_line(monkeypatch):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["+experiment=smoke", "benchmark.backends=[torch,tensorrt]"]))
    assert "'tensorrt'" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs onnxruntime: pip install 'effrun\[deploy\]'"):
        validate(compose_cfg(["+experiment=smoke", "benchmark.backends=[onnxruntime]"]))


def test_float_model_on_every_runtime(smoke_run, tmp_path):
    """The smoke run's distilled student, benchmarked alone on three runtimes: one record per
    runtime, fp32 runtimes agree on top-1, the ONNX file is written once into the benchmark
    stage's dir, every point says its runtime and the run names the fastest deployable."""
    run_dir, _ = smoke_run
    overrides = ["+experiment=smoke", "stages=[benchmark]", "hardware.precision=fp32",
                 f"init_from={run_dir / '03_distill' / 'model.pt'}",
                 "benchmark.backends=[torch,onnxruntime,openvino]",
                 "benchmark.batch_sizes=[1,4]", "benchmark.iters=4", "benchmark.rounds=2",
                 "benchmark.warmup=1", "benchmark.min_time_s=0"]
    rows = pipeline.run(compose_cfg(overrides), tmp_path / "run")
    assert [r["backend"] for r in rows] == ["torch", "onnxruntime", "openvino"]
    accuracies = {r["backend"]: r["accuracy"] for r in rows}
    assert accuracies["onnxruntime"] == accuracies["openvino"] == pytest.approx(
        accuracies["torch"], abs=0.01), accuracies
    assert all(r["latency_ms_p50_bs1"] and r["latency_ms_p50_bs_max"] for r in rows)
    assert [r["precision"] for r in rows] == ["fp32", "fp32", "fp32"]
    bench = json.loads((tmp_path / "run" / "05_benchmark" / "metrics.json").read_text())
    model = bench["models"][0]
    assert {(p["backend"], p["batch_size"]) for p in model["latency"]} == {
        (b, bs) for b in ("torch", "onnxruntime", "openvino") for bs in (1, 4)}
    assert [p.name for p in (tmp_path / "run" / "05_benchmark" / "exports").iterdir()] == [
        "03_distill_model_fp32.onnx"], "exported once, read by both runtimes"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["fastest"]["batch_1"]["backend"] in ("torch", "onnxruntime", "openvino")
    assert summary["headline"]["accuracy"] == accuracies["torch"]
