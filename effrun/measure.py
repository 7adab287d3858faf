"""Measurement helpers: parameters, FLOPs, latency/throughput, peak memory, artifact size."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from effrun.hardware import release_freed_memory

log = logging.getLogger("effrun")


@dataclass
class ModelFigures:
    """Size figures of one model: parameter count, FLOPs of a 1-image forward (None where the
    graph cannot be counted) and `weight_bytes`, the bytes of the tensors it reads when it runs
    (parameters and buffers; for int8, the int8 weights, scales and zero points). The artifact
    file's size is a separate figure, `file_bytes`."""

    params: int
    flops: int | None
    weight_bytes: int


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensor storages (a tensor shared by two names counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_figures(model: nn.Module, image_size: tuple[int, int], channels: int = 3
                  ) -> ModelFigures:
    """Params, FLOPs (of one image) and weight bytes of an nn.Module."""
    try:
        flops = count_flops(model, (1, channels, *image_size))
    except Exception as e:  # some exported/quantized graphs cannot be counted; say so, go on
        log.warning("FLOPs not counted for this model: %s", str(e).splitlines()[0])
        flops = None
    return ModelFigures(params=count_params(model), flops=flops,
                        weight_bytes=tensor_bytes([*model.parameters(), *model.buffers()]))


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


@contextlib.contextmanager
def _eval_mode(model: Callable) -> Iterator[None]:
    """Put an nn.Module in eval mode, restoring every submodule's own train/eval flag after."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def count_flops(model: nn.Module, input_shape: tuple) -> int:
    """FLOPs of one eval-mode forward on a zero tensor of `input_shape` (batch dim included).

    Counted by `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-accumulate as
    2 FLOPs (FLOPs = 2 x MACs) and only counts matmul/conv-like ops (BN, ReLU, pooling and adds
    are not counted). Papers quoting "FLOPs" usually mean MACs: ResNet-56's "125M" is ~250M here.
    """
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    example = torch.zeros(tuple(input_shape), device=device, dtype=dtype or torch.float32)
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), counter:
        model(example)
    return int(counter.get_total_flops())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Percentile by linear interpolation between closest ranks (numpy's default method)."""
    position = fraction * (len(sorted_values) - 1)
    lower = int(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


def measure_latency(
    model: Callable,
    example: torch.Tensor,
    *,
    warmup: int = 5,
    iters: int = 30,
    min_time_s: float = 0.0,
    device: str | torch.device | None = None,
) -> dict:
    """Wall-clock latency of `model(example)` under inference_mode.

    `device` (default: the example's device) is where the example is moved and what is
    synchronised around each call on CUDA; the model must already be there. nn.Modules run in
    eval mode for the measurement. Times at least `iters` calls and keeps going until
    `min_time_s` of measured time has elapsed. Percentiles use linear interpolation; throughput
    (inputs/s) is batch_size / median latency.
    """
    return measure_interleaved({"model": model}, example, warmup=warmup, iters=iters,
                               min_time_s=min_time_s, rounds=1, device=device)["model"]


def measure_interleaved(
    fns: dict[Any, Callable],
    example: torch.Tensor | dict[Any, torch.Tensor],
    *,
    warmup: int = 5,
    iters: int = 30,
    min_time_s: float = 0.0,
    rounds: int = 5,
    device: str | torch.device | None = None,
) -> dict[Any, dict]:
    """Latency of several callables on one input, timed in interleaved rounds: each round times
    every callable for about iters / rounds calls (and min_time_s / rounds seconds) in turn, so
    a load change on a shared machine hits them all alike instead of whichever ran then.
    `example` is one input for all, or {key: input} (e.g. in each model's memory format);
    `device`, when given, is where the inputs are moved, else each stays where it is. Each call
    is synchronised on its input's device (CUDA).
    Returns {key: figures as measure_latency gives them}, from all of a key's timed calls."""
    if iters < 1 or rounds < 1:
        raise ValueError(f"iters and rounds must be >= 1, got {iters} and {rounds}")
    examples = example if isinstance(example, dict) else dict.fromkeys(fns, example)
    if device is not None:
        examples = {key: x.to(device) for key, x in examples.items()}
    per_round, time_per_round = max(1, -(-iters // rounds)), min_time_s / rounds
    times_s: dict[Any, list[float]] = {key: [] for key in fns}
    with contextlib.ExitStack() as stack:
        for fn in fns.values():
            stack.enter_context(_eval_mode(fn))
        stack.enter_context(torch.inference_mode())
        for key, fn in fns.items():
            for _ in range(warmup):
                fn(examples[key])
            _synchronize(examples[key].device)
        for _ in range(rounds):
            for key, fn in fns.items():
                times_s[key].extend(_timed_calls(fn, examples[key], per_round, time_per_round))
    return {key: latency_figures(t, examples[key]) for key, t in times_s.items()}


def _timed_calls(fn: Callable, example: torch.Tensor, calls: int, min_time_s: float
                 ) -> list[float]:
    times: list[float] = []
    while len(times) < calls or sum(times) < min_time_s:
        start = time.perf_counter()
        fn(example)
        _synchronize(example.device)
        times.append(time.perf_counter() - start)
    return times


def latency_figures(times_s: list[float], example: torch.Tensor) -> dict:
    """p50/p90/p99/mean latency (ms) and throughput of timed calls on `example`."""
    batch_size = example.shape[0] if example.dim() > 0 else 1
    times_ms = sorted(t * 1000.0 for t in times_s)
    p50 = _percentile(times_ms, 0.50)
    return {
        "latency_ms_p50": p50,
        "latency_ms_p90": _percentile(times_ms, 0.90),
        "latency_ms_p99": _percentile(times_ms, 0.99),
        "latency_ms_mean": sum(times_ms) / len(times_ms),
        "throughput_ips": batch_size / (p50 / 1000.0) if p50 > 0 else float("inf"),
        "batch_size": batch_size,
        "iters": len(times_ms),
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_bytes(
    fn: Callable[[], object], device: str | torch.device | None = None
) -> int | None:
    """Peak memory used while running `fn()`; None where it cannot be measured.

    With a CUDA `device`: peak allocated by PyTorch's CUDA allocator during `fn`. Otherwise
    (default): growth of the process's peak resident set on Linux. Writing "5" to
    /proc/self/clear_refs resets VmHWM to the current RSS, so the result is VmHWM after `fn`
    minus RSS before it. That includes any memory `fn` touches (not just tensors) and, like RSS,
    only pages actually written: `torch.empty` of untouched memory does not count. Free heap pages
    are handed back first, else memory kept by hardware.reuse_freed_memory would hide `fn`'s use.
    """
    if device is not None and torch.device(device).type == "cuda":
        device = torch.device(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - baseline)
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        rss_before_kib = _status_kib("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    try:
        peak_kib = _status_kib("VmHWM")
    except OSError:
        return None
    return max(0, peak_kib - rss_before_kib) * 1024


def artifact_size_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or the total size of the files under a directory."""
    path = Path(path)
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


@contextlib.contextmanager
def set_threads(n: int | None) -> Iterator[None]:
    """Temporarily `torch.set_num_threads(n)`; None leaves the thread count alone."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
