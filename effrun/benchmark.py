"""The benchmark stage: reload every model artifact of the run and measure it the same way.

Accuracy comes from the reloaded artifact (so a broken save shows up here), latency from timed
calls after warm-up at each batch size and thread count, eager and — with hardware.compile, or
when the artifact's `Deployment` gives compile options — compiled, so the gain of compilation is
visible. An artifact whose deployment names a reference (`compare_to`, e.g. int8 → its float
parent) is timed against it point by point, and flagged where it is not faster or where the
fused kernels it expects did not appear. How an artifact runs is read only from its
`Deployment` (effrun/stage.py), never from other metadata keys.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effrun.artifacts import load_model
from effrun.compile import Compiled, compile_and_list_kernels
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.measure import (
    artifact_size_bytes,
    measure_latency,
    model_figures,
    peak_memory_bytes,
    set_threads,
)
from effrun.stage import Deployment

log = logging.getLogger("effrun")

FIGURES = ("params", "flops", "weight_bytes")


class Inference(nn.Module):
    """A model as deployed: eval mode, the run's autocast precision, no autograd."""

    def __init__(self, model: nn.Module, hw: Hardware, autocast: bool = True):
        super().__init__()
        self.model = model
        # Resolved here, not in forward: under torch.compile, asking the hardware (which reads
        # /proc/cpuinfo for `auto` precision) would be traced on every compilation.
        self.device_type = hw.torch_device.type
        self.dtype = hw.autocast_dtype if autocast else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(x)


@dataclass
class Deployed:
    """A model made ready to run as its `Deployment` says: the eager form and every timed
    variant ("eager", and "compiled" when hardware.compile or the deployment asks for it)."""

    deploy: Deployment
    hw: Hardware  # the run's hardware, on the device the deployment asks for
    eager: Inference
    variants: dict[str, nn.Module]

    @property
    def scored(self) -> nn.Module:
        """The form accuracy is scored on: an artifact that must be compiled to run as intended
        (int8) is scored compiled (its eager form runs slow reference kernels with slightly
        different rounding)."""
        return self.variants["compiled"] if self.deploy.compile_options is not None else self.eager


def benchmark_models(records, data, config) -> list[dict]:
    """Benchmark every record's artifact; `config` is the validated config (effrun.schema)."""
    results = []
    for rec in records:
        log.info("benchmark: %s (%s)", rec.stage, rec.artifact)
        model, meta = load_model(rec.artifact, trusted=config.run.trust_artifact
                                 or not rec.stage.startswith("init:"))  # init_from: scanned
        deploy = own_reference(Deployment.from_meta(meta), records)
        results.append(benchmark_one(model, deploy, rec, data, config))
    return results


def own_reference(deploy: Deployment, records) -> Deployment:
    """`compare_to` names the parent's artifact in the run that made the artifact; a stage the
    stage cache reused names the file of the run that computed it. This run's own file of that
    stage (same stage dir and file name; the same bytes, by the cache key) is measured instead,
    so the comparison does not depend on another run dir still being there."""
    if not deploy.compare_to:
        return deploy
    ref = Path(deploy.compare_to)
    for rec in records:
        own = Path(rec.artifact)
        if (own.parent.name, own.name) == (ref.parent.name, ref.name):
            return dataclasses.replace(deploy, compare_to=str(own))
    return deploy


def benchmark_one(model: nn.Module, deploy: Deployment, rec, data, config) -> dict:
    """Accuracy, size and latency of one artifact, run as its `Deployment` says: its precision,
    `compile_options` (also compiles without hardware.compile), `expected_kernels` (fused
    kernels the compiled code must call, else a flag) and `compare_to` (a reference artifact
    timed the same way, each ratio reported, slower points flagged)."""
    hw = deployed_hardware(config.hardware, deploy)
    figures = size_figures(model, rec, data)  # before the model is moved or compiled
    target = deploy_model(model, deploy, hw)
    flags: list[str] = []
    found = expected_kernels(target, data, config, flags)  # compiles at the eval shape
    out = {"stage": rec.stage, "artifact": str(rec.artifact),
           "accuracy": score(target, data, config), **figures, "latency": [], "flags": flags}
    if found is not None:
        out["kernels_found"] = found
    reference = load_reference(deploy, hw)
    if reference is not None:
        out["vs_reference"] = {"artifact": deploy.compare_to, "points": []}
    time_all(target, reference, data, config, out)
    out["peak_memory_bytes"] = peak_memory(target, data, config)
    out["precision"] = deploy.precision if deploy.native else hw.resolved_precision
    for flag in flags:
        log.warning("benchmark %s: %s", rec.stage, flag)
    return out


def size_figures(model: nn.Module, rec, data) -> dict:
    """params, flops, weight_bytes (the bytes of the tensors the deployed model reads) and
    file_bytes (the artifact file's size). The first three come from the stage's metrics when
    it recorded them; a model given by init_from has none, so it is measured here."""
    metrics = getattr(rec, "metrics", None) or {}
    if all(k in metrics for k in FIGURES):
        figures = {k: metrics[k] for k in FIGURES}
    else:
        figures = vars(model_figures(model, data.image_size)).copy()
    return {**figures, "file_bytes": artifact_size_bytes(rec.artifact)}


def deployed_hardware(hw: Hardware, deploy: Deployment) -> Hardware:
    """The run's hardware, moved to the device the deployment must run on (x86 int8: the CPU,
    also when the run trained on a GPU)."""
    if deploy.device is None or deploy.device == hw.device:
        return hw
    return dataclasses.replace(hw, device=deploy.device)


def deploy_model(model: nn.Module, deploy: Deployment, hw: Hardware) -> Deployed:
    """Float models run as the run trains them (autocast precision, memory format); a native
    one (int8) carries its own numerics and runs as it is, on the run's device."""
    model = model.to(hw.torch_device) if deploy.native else hw.prepare(model)
    model.eval()
    eager = Inference(model, hw, autocast=not deploy.native)
    if deploy.compile_options is not None:
        # Deployed compiled only (int8: eager runs reference q/dq kernels no user deploys), so
        # only the compiled form is timed and judged.
        return Deployed(deploy, hw, eager,
                        {"compiled": Compiled(eager, deploy.compile_options, dynamic=False)})
    variants: dict[str, nn.Module] = {"eager": eager}
    if hw.compile:
        variants["compiled"] = Compiled(eager, {}, dynamic=False)
    return Deployed(deploy, hw, eager, variants)


def load_reference(deploy: Deployment, hw: Hardware) -> Deployed | None:
    """The artifact this one is compared against, compiled with the same Inductor settings."""
    path = deploy.compare_to
    if not path:
        return None
    if not Path(path).exists():
        log.warning("benchmark: reference artifact %s is gone; no comparison", path)
        return None
    ref_model, ref_meta = load_model(Path(path))  # named by the artifact's metadata: scanned
    ref_deploy = dataclasses.replace(Deployment.from_meta(ref_meta),
                                     compile_options=deploy.compile_options)
    return deploy_model(ref_model, ref_deploy, hw)


def eval_hardware(target: Deployed, hw: Hardware) -> Hardware:
    """How inputs are fed: a native model takes them as they come (contiguous)."""
    return dataclasses.replace(hw, channels_last=False) if target.deploy.native else hw


def expected_kernels(target: Deployed, data, config, flags: list[str]) -> list[str] | None:
    """The fused kernels the compiled form calls, when its deployment expects some (None when
    it does not, or when nothing is compiled). Compiles at the evaluation batch shape, which
    scoring then reuses; an empty list is flagged."""
    pattern = target.deploy.expected_kernels
    if "compiled" not in target.variants or not pattern:
        return None
    hw = target.hw
    shape = (score_batch(target, data, config), 3, *data.image_size)
    example = torch.randn(shape, device=hw.torch_device)
    found = sorted(compile_and_list_kernels(target.variants["compiled"], example))
    if not found:
        flags.append(f"the compiled graph has none of the expected fused kernels ({pattern}): "
                     f"it runs unfused reference ops")
    return found


def score_batch(target: Deployed, data, config) -> int:
    """The evaluation batch: a model that must be compiled is scored at the largest benchmarked
    batch (short last batch padded), so scoring and timing share one compiled graph."""
    if target.deploy.compile_options is not None:
        return max(config.run.benchmark.batch_sizes)
    return min(config.run.train.eval_batch_size, len(data.test_y))


def score(target: Deployed, data, config) -> float:
    """Top-1 on the test split, as deployed (see `Deployed.scored`)."""
    result = evaluate(target.scored, data.test_x, data.test_y, data,
                      eval_hardware(target, target.hw), tta=config.run.train.tta,
                      batch_size=score_batch(target, data, config),
                      pad_last=target.deploy.compile_options is not None)
    return result["accuracy"]


def time_all(target: Deployed, reference: Deployed | None, data, config, out: dict) -> None:
    """Every (threads, batch size, variant) point into out["latency"] (and the comparison)."""
    bcfg, hw = config.run.benchmark, target.hw
    for threads in bcfg.threads or [torch.get_num_threads()]:
        with set_threads(threads):
            for bs in bcfg.batch_sizes:
                example = torch.randn(bs, 3, *data.image_size, device=hw.torch_device)
                for mode in target.variants:
                    time_point(target, reference, mode, example, threads, config, out)


def time_point(target: Deployed, reference: Deployed | None, mode: str, example: torch.Tensor,
               threads: int, config, out: dict) -> None:
    """Time one variant at one (threads, batch) point; with a reference that has the same
    variant, time it too and record the ratio (flagged when not faster)."""
    bs = example.shape[0]
    m = measure(target, mode, example, config)
    out["latency"].append({"threads": threads, "mode": mode, **m})
    log_point(mode, threads, bs, m)
    if reference is None or mode not in reference.variants:
        return
    ref = measure(reference, mode, example, config)
    ratio = m["latency_ms_p50"] / ref["latency_ms_p50"]
    out["vs_reference"]["points"].append(
        {"threads": threads, "batch_size": bs, "mode": mode, "ratio": ratio,
         "latency_ms_p50": m["latency_ms_p50"], "reference_latency_ms_p50": ref["latency_ms_p50"]})
    log.info("  %-8s threads=%d batch=%-4d reference p50 %.3f ms -> ratio %.3f",
             mode, threads, bs, ref["latency_ms_p50"], ratio)
    if ratio >= 1:
        out["flags"].append(f"not faster than {out['vs_reference']['artifact']} ({mode}, "
                            f"batch {bs}, {threads} threads): ratio {ratio:.2f}")


def measure(target: Deployed, mode: str, example: torch.Tensor, config) -> dict:
    """Latency of one variant; float inputs come in the run's memory format."""
    bcfg, hw = config.run.benchmark, target.hw
    if not target.deploy.native:
        example = example.contiguous(memory_format=hw.memory_format)
    return measure_latency(target.variants[mode], example, warmup=bcfg.warmup, iters=bcfg.iters,
                           min_time_s=bcfg.min_time_s, device=hw.torch_device)


def peak_memory(target: Deployed, data, config) -> int | None:
    """Peak memory of one forward, as deployed, at the largest benchmarked batch."""
    hw = target.hw
    example = torch.randn(max(config.run.benchmark.batch_sizes), 3, *data.image_size,
                          device=hw.torch_device)
    if not target.deploy.native:
        example = example.contiguous(memory_format=hw.memory_format)
    with torch.inference_mode():
        return peak_memory_bytes(lambda: target.scored(example), device=hw.torch_device)


def log_point(mode: str, threads: int, bs: int, m: dict) -> None:
    log.info("  %-8s threads=%d batch=%-4d p50 %.3f ms  p90 %.3f  p99 %.3f  %.0f img/s", mode,
             threads, bs, m["latency_ms_p50"], m["latency_ms_p90"], m["latency_ms_p99"],
             m["throughput_ips"])
