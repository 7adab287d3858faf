"""The benchmark stage: reload every model artifact of the run and measure it the same way.

Accuracy comes from the reloaded artifact (so a broken save shows up here), latency from timed
calls after warm-up at each batch size and thread count, eager and — with hardware.compile —
compiled, so the gain of compilation is visible.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from effrun.artifacts import load_model
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.profile import (
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
    hw, bcfg = r.hardware, r.run.benchmark
    # Float models run as the run trains them (autocast precision, memory format); a model that
    # carries its own numerics (e.g. int8) says so in its metadata and runs as it is.
    native = meta.get("precision") not in (None, "float")
    model = model.to(hw.torch_device) if native else hw.prepare(model)
    model.eval()
    inference = Inference(model, hw, autocast=not native)
    acc = evaluate(inference, data.test_x, data.test_y, data, hw,
                   batch_size=r.run.train.eval_batch_size, tta=r.run.train.tta)
    shape = (3, *data.image_size)
    out = {"stage": rec.stage, "artifact": str(rec.artifact), "accuracy": acc["accuracy"],
           "params": rec.metrics.get("params") or count_params(model),
           "flops": rec.metrics.get("flops") or _try_flops(model, shape),
           "size_bytes": artifact_size_bytes(rec.artifact), "latency": []}
    variants = {"eager": inference}
    if hw.compile:
        variants["compiled"] = torch.compile(inference)
    threads_list = bcfg.threads or [torch.get_num_threads()]
    for threads in threads_list:
        with set_threads(threads):
            for bs in bcfg.batch_sizes:
                example = torch.randn(bs, *shape, device=hw.torch_device)
                if not native:
                    example = example.contiguous(memory_format=hw.memory_format)
                for mode, fn in variants.items():
                    m = measure_latency(fn, example, warmup=bcfg.warmup, iters=bcfg.iters,
                                        min_time_s=bcfg.min_time_s, device=hw.torch_device)
                    out["latency"].append({"threads": threads, "mode": mode, **m})
                    log.info("  %-8s threads=%d batch=%-4d p50 %.3f ms  p90 %.3f  p99 %.3f  "
                             "%.0f img/s", mode, threads, bs, m["latency_ms_p50"],
                             m["latency_ms_p90"], m["latency_ms_p99"], m["throughput_ips"])
    big = torch.randn(max(bcfg.batch_sizes), *shape, device=hw.torch_device)
    with torch.inference_mode():
        out["peak_memory_bytes"] = peak_memory_bytes(lambda: inference(big),
                                                     device=hw.torch_device)
    out["precision"] = meta.get("precision") or hw.resolved_precision
    return out


def _try_flops(model: nn.Module, shape) -> int | None:
    try:
        return count_flops(model, (1, *shape))
    except Exception:  # exported/quantized graphs may not be countable
        return None
