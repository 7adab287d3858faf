"""Measurement helpers: FLOP formulas, latency statistics, thread and memory bookkeeping."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from torch import nn

from effrun.measure import (
    artifact_size_bytes,
    count_flops,
    count_params,
    measure_latency,
    peak_memory_bytes,
    set_threads,
)


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's 2 cores are shared; one intra-op thread avoids contention stalls.
    with set_threads(1):
        yield


def test_count_params():
    assert count_params(nn.Linear(64, 32)) == 64 * 32 + 32
    assert count_params(nn.Conv2d(3, 8, 3, bias=False)) == 8 * 3 * 3 * 3


def test_count_flops_linear_is_two_macs():
    # FLOPs = 2 * batch * in * out (bias add not counted).
    assert count_flops(nn.Linear(64, 32), (4, 64)) == 2 * 4 * 64 * 32


def test_count_flops_conv_is_two_macs():
    # FLOPs = 2 * output elements * (in_channels / groups * kh * kw).
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (2, 3, 16, 16)) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    assert count_flops(depthwise, (1, 8, 16, 16)) == 2 * (8 * 8 * 8) * (1 * 3 * 3)


def test_count_flops_restores_each_modules_mode():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    count_flops(model, (4, 8))
    assert [module.training for module in model.modules()] == [True, True, True, False]


def test_measure_latency_statistics():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU()).train()
    stats = measure_latency(model, torch.randn(8, 32), warmup=2, iters=25)
    assert set(stats) == {
        "latency_ms_p50",
        "latency_ms_p90",
        "latency_ms_p99",
        "latency_ms_mean",
        "throughput_ips",
        "batch_size",
        "iters",
    }
    assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p90"] <= stats["latency_ms_p99"]
    assert stats["throughput_ips"] > 0
    assert stats["throughput_ips"] == pytest.approx(8 / (stats["latency_ms_p50"] / 1000))
    assert stats["batch_size"] == 8 and stats["iters"] == 25
    assert model.training  # measured in eval mode, mode restored afterwards


def test_measure_latency_runs_until_min_time():
    def slow_model(x):
        time.sleep(0.002)
        return x

    stats = measure_latency(slow_model, torch.zeros(1), warmup=0, iters=1, min_time_s=0.03)
    # Timed past `iters` until 30 ms were measured (a loaded machine stretches each sleep, so
    # count the time, not the calls).
    assert stats["iters"] >= 2
    assert stats["latency_ms_mean"] * stats["iters"] >= 30.0
    assert stats["latency_ms_p50"] >= 2.0


def test_set_threads_restores():
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    with set_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), set_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with set_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.parametrize("reuse", [False, True], ids=["glibc_default", "reuse_freed_memory"])
def test_peak_memory_bytes_cpu(reuse):
    from effrun.hardware import keep_freed_memory

    keep_freed_memory(reuse)
    warm = torch.ones(60 * 2**20 // 4)  # leaves freed heap pages behind when they are kept
    del warm

    def allocate_50mb():
        tensor = torch.ones(50 * 2**20 // 4)  # ones() writes every page, so RSS grows
        return float(tensor[0])

    peak = peak_memory_bytes(allocate_50mb)
    assert isinstance(peak, int)
    assert peak >= 40 * 2**20


def test_artifact_size_bytes(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "extra.bin").write_bytes(b"y" * 24)
    assert artifact_size_bytes(tmp_path / "model.pt") == 1000
    assert artifact_size_bytes(tmp_path) == 1024
