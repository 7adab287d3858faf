"""The benchmark stage: reload every model artifact of the run and measure it the same way.

Accuracy comes from the reloaded artifact (so a broken save shows up here), latency from timed
calls after warm-up at each batch size and thread count, eager and — with hardware.compile, or
when the artifact's metadata gives compile options — compiled, so the gain of compilation is
visible. An artifact whose metadata names a reference (`compare_to`, e.g. int8 → its float
parent) is timed against it point by point, and flagged where it is not faster or where the
fused kernels it expects did not appear.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from effrun.artifacts import load_model
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.measure import (
    artifact_size_bytes,
    count_flops,
    count_params,
    measure_latency,
    peak_memory_bytes,
    set_threads,
)

log = logging.getLogger("effrun")


class Inference(nn.Module):
    """A model as deployed: eval mode, the run's autocast precision, no autograd."""

    def __init__(self, model: nn.Module, hw: Hardware, autocast: bool = True):
        super().__init__()
        self.model, self.hw, self.use_autocast = model, hw, autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_autocast:
            return self.model(x)
        with self.hw.autocast():
            return self.model(x)


def benchmark_models(records, data, r) -> list[dict]:
    results = []
    for rec in records:
        log.info("benchmark: %s (%s)", rec.stage, rec.artifact)
        model, meta = load_model(rec.artifact)
        results.append(benchmark_one(model, meta, rec, data, r))
    return results


def benchmark_one(model: nn.Module, meta: dict, rec, data, r) -> dict:
    """Accuracy, size and latency of one artifact. Metadata can ask for more (int8 does):
    `compile_options` (Inductor settings; also compiles without hardware.compile),
    `expected_kernels` (a regex the compiled code must match, else a flag) and `compare_to`
    (a reference artifact timed the same way, each ratio reported, slower points flagged)."""
    hw, bcfg = r.hardware, r.run.benchmark
    inference, variants, native = _variants(model, meta, hw)
    # Top-1 as deployed: an artifact that must be compiled to run as intended (int8) is scored
    # compiled (its eager form runs slow reference kernels with slightly different rounding).
    scored = variants["compiled"] if meta.get("compile_options") is not None else inference
    eval_hw = replace(hw, channels_last=False) if native else hw  # native: inputs as they come
    shape = (3, *data.image_size)
    flags: list[str] = []
    found = None
    if "compiled" in variants and meta.get("expected_kernels"):  # compiles at the eval shape
        eval_shape = (min(r.run.train.eval_batch_size, len(data.test_y)), *shape)
        found = _kernels(variants["compiled"], torch.randn(eval_shape, device=hw.torch_device),
                         meta["expected_kernels"], flags)
    acc = evaluate(scored, data.test_x, data.test_y, data, eval_hw,
                   batch_size=r.run.train.eval_batch_size, tta=r.run.train.tta)
    out = {"stage": rec.stage, "artifact": str(rec.artifact), "accuracy": acc["accuracy"],
           "params": rec.metrics.get("params") or count_params(model),
           "flops": rec.metrics.get("flops") or _try_flops(model, shape),
           "size_bytes": meta.get("size_bytes") or artifact_size_bytes(rec.artifact),
           "artifact_bytes": artifact_size_bytes(rec.artifact), "latency": [], "flags": flags}
    if found is not None:
        out["kernels_found"] = found
    reference = _reference(meta, hw)
    if reference is not None:
        out["vs_reference"] = {"artifact": meta["compare_to"], "points": []}
    threads_list = bcfg.threads or [torch.get_num_threads()]
    for threads in threads_list:
        with set_threads(threads):
            for bs in bcfg.batch_sizes:
                example = torch.randn(bs, *shape, device=hw.torch_device)
                for mode, fn in variants.items():
                    m = _measure(fn, example, native, hw, bcfg)
                    out["latency"].append({"threads": threads, "mode": mode, **m})
                    _log_point(mode, threads, bs, m)
                    if reference is None or mode not in reference[1]:
                        continue
                    ref = _measure(reference[1][mode], example, reference[2], hw, bcfg)
                    ratio = m["latency_ms_p50"] / ref["latency_ms_p50"]
                    out["vs_reference"]["points"].append(
                        {"threads": threads, "batch_size": bs, "mode": mode, "ratio": ratio,
                         "latency_ms_p50": m["latency_ms_p50"],
                         "reference_latency_ms_p50": ref["latency_ms_p50"]})
                    log.info("  %-8s threads=%d batch=%-4d reference p50 %.3f ms -> ratio %.3f",
                             mode, threads, bs, ref["latency_ms_p50"], ratio)
                    if ratio >= 1:
                        out["flags"].append(f"not faster than {meta['compare_to']} ({mode}, "
                                            f"batch {bs}, {threads} threads): ratio {ratio:.2f}")
    big = torch.randn(max(bcfg.batch_sizes), *shape, device=hw.torch_device)
    with torch.inference_mode():
        out["peak_memory_bytes"] = peak_memory_bytes(lambda: inference(big),
                                                     device=hw.torch_device)
    out["precision"] = meta.get("precision") or hw.resolved_precision
    for flag in out["flags"]:
        log.warning("benchmark %s: %s", rec.stage, flag)
    return out


def _variants(model: nn.Module, meta: dict, hw: Hardware) -> tuple[nn.Module, dict, bool]:
    # Float models run as the run trains them (autocast precision, memory format); a model that
    # carries its own numerics (e.g. int8) says so in its metadata and runs as it is.
    native = meta.get("precision") not in (None, "float")
    model = model.to(hw.torch_device) if native else hw.prepare(model)
    model.eval()
    inference = Inference(model, hw, autocast=not native)
    variants = {"eager": inference}
    options = meta.get("compile_options")
    if hw.compile or options is not None:
        variants["compiled"] = Compiled(inference, options or {})
    return inference, variants, native


def _reference(meta: dict, hw: Hardware):
    """The artifact this one is compared against, compiled with the same Inductor settings."""
    path = meta.get("compare_to")
    if not path:
        return None
    if not Path(path).exists():
        log.warning("benchmark: reference artifact %s is gone; no comparison", path)
        return None
    ref_model, ref_meta = load_model(Path(path))
    ref_meta = {**ref_meta, "compile_options": meta.get("compile_options")}
    return _variants(ref_model, ref_meta, hw)


class Compiled(nn.Module):
    """torch.compile of `fn`; every (re)compilation runs under the given Inductor settings.
    Static shapes: each batch size gets its own graph, as a deployment at that batch would (a
    graph recompiled with a symbolic batch was measured ~5x slower at batch 1 on the CPU)."""

    def __init__(self, fn: nn.Module, options: dict):
        super().__init__()
        self.fn, self.options = fn, options
        self.compiled = torch.compile(fn, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch._inductor.config.patch(**self.options):
            return self.compiled(x)


def _kernels(fn: Compiled, example: torch.Tensor, pattern: str, flags: list[str]) -> list[str]:
    """First call of a compiled model: the kernels matching `pattern` in the generated code."""
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode(), torch._inductor.config.patch(**fn.options):
        _, codes = run_and_get_code(fn.compiled, example)
    found = sorted(set(re.findall(pattern, "\n".join(codes))))
    if not found:
        flags.append(f"the compiled graph has none of the expected fused kernels ({pattern}): "
                     f"it runs unfused reference ops")
    return found


def _measure(fn, example: torch.Tensor, native: bool, hw: Hardware, bcfg) -> dict:
    if not native:
        example = example.contiguous(memory_format=hw.memory_format)
    return measure_latency(fn, example, warmup=bcfg.warmup, iters=bcfg.iters,
                           min_time_s=bcfg.min_time_s, device=hw.torch_device)


def _log_point(mode: str, threads: int, bs: int, m: dict) -> None:
    log.info("  %-8s threads=%d batch=%-4d p50 %.3f ms  p90 %.3f  p99 %.3f  %.0f img/s", mode,
             threads, bs, m["latency_ms_p50"], m["latency_ms_p90"], m["latency_ms_p99"],
             m["throughput_ips"])


def _try_flops(model: nn.Module, shape) -> int | None:
    try:
        return count_flops(model, (1, *shape))
    except Exception:  # exported/quantized graphs may not be countable
        return None
