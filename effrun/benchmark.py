"""The benchmark stage: reload every model artifact of the run and measure it the same way, on
every runtime it runs on (`benchmark.backends`: torch, onnxruntime, openvino).

Accuracy comes from the reloaded artifact as deployed on each runtime (so a broken save or a
bad export shows up here). Latency: at each thread count and batch size, every timed form —
torch eager and compiled, each runtime's session, and the reference the artifact is compared
against (`compare_to`, e.g. int8 → its float parent) on the same runtimes — is timed in
interleaved rounds (effrun.measure.measure_interleaved) with the same intra-op threads, so
ratios compare like with like under the same load. An artifact is flagged where the form a
user deploys (compiled when it was compiled; a runtime's own session) is not faster than its
reference on the same runtime, or where the fused kernels it expects did not appear. How an
artifact runs is read only from its `Deployment` (effrun/stage.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from effrun.artifacts import load_model
from effrun.deployed import (
    Deployed,
    RuntimeFiles,
    deploy_model,
    deployed_hardware,
    expected_kernels,
    load_reference,
    score,
    score_batch,
)
from effrun.evaluate import evaluate
from effrun.hardware import Hardware
from effrun.measure import (
    artifact_size_bytes,
    measure_interleaved,
    model_figures,
    peak_memory_bytes,
    set_threads,
)
from effrun.stage import Deployment

log = logging.getLogger("effrun")

FIGURES = ("params", "flops", "weight_bytes")
# Other runtimes take float32 contiguous CPU inputs and run their own numerics.
RUNTIME_HW = Hardware(device="cpu", precision="fp32", channels_last=False)


@dataclass
class OnRuntimes:
    """One model on every runtime it runs on: its torch deployment and its runtime files."""

    torch: Deployed | None
    files: dict[str, Path] = field(default_factory=dict)  # backend -> the file it loads

    @property
    def backends(self) -> list[str]:
        return (["torch"] if self.torch is not None else []) + list(self.files)

    def forms(self, runtimes: RuntimeFiles, threads: int) -> dict[tuple[str, str], nn.Module]:
        """{(backend, mode): callable} of every timed form at `threads` threads."""
        out = {("torch", mode): fn for mode, fn in (self.torch.variants.items()
                                                   if self.torch is not None else ())}
        for backend, path in self.files.items():
            out[(backend, backend)] = runtimes.session(path, backend, threads)
        return out

    def example(self, backend: str, x: torch.Tensor) -> torch.Tensor:
        return self.torch.example(x) if backend == "torch" else x.cpu()

    def deployed_mode(self, backend: str) -> str:
        return self.torch.deployed_mode if backend == "torch" else backend


def benchmark_models(records, data, config, stage_dir: Path) -> list[dict]:
    """Benchmark every record's artifact; `config` is the validated config (effrun.schema).
    Float models that were not exported are exported into `stage_dir`/exports for the
    non-torch runtimes."""
    runtimes = RuntimeFiles(Path(stage_dir) / "exports",
                            (int(data.train_x.shape[1]), *data.image_size))
    results = []
    for rec in records:
        log.info("benchmark: %s (%s)", rec.stage, rec.artifact)
        model, meta = load_model(rec.artifact, trusted=config.run.trust_artifact
                                 or not rec.stage.startswith("init:"))  # init_from: scanned
        deploy = own_reference(Deployment.from_meta(meta), records)
        results.append(benchmark_one(model, deploy, rec, data, config, runtimes))
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


def benchmark_one(model: nn.Module, deploy: Deployment, rec, data, config,
                  runtimes: RuntimeFiles) -> dict:
    """Accuracy, size, latency and peak memory of one artifact on each runtime it runs on (its
    own runtime first), and its ratios to its reference."""
    hw = deployed_hardware(config.hardware, deploy)
    figures = size_figures(model, rec, data)  # before the model is moved or compiled
    target = on_runtimes(model, deploy, Path(rec.artifact), hw, config, runtimes)
    flags: list[str] = []
    out = {"stage": rec.stage, "artifact": str(rec.artifact),
           "backend": target.backends[0], **figures, "latency": [], "flags": flags}
    if target.torch is not None:
        found = expected_kernels(target.torch, score_batch(target.torch, data, config),
                                 data.image_size, flags)  # compiles at the scoring shape
        if found is not None:
            out["kernels_found"] = found
    out["backends"] = {b: runtime_figures(target, b, deploy, data, config, runtimes)
                       for b in target.backends}
    reference = reference_on_runtimes(deploy, hw, config, runtimes, target.backends)
    if reference is not None:
        out["vs_reference"] = {"artifact": deploy.compare_to, "points": []}
    time_all(target, reference, data, config, runtimes, out)
    own = out["backends"][out["backend"]]
    out.update(accuracy=own["accuracy"], precision=own["precision"],
               peak_memory_bytes=own["peak_memory_bytes"])
    for flag in flags:
        log.warning("benchmark %s: %s", rec.stage, flag)
    return out


def on_runtimes(model: nn.Module, deploy: Deployment, artifact: Path, hw: Hardware, config,
                runtimes: RuntimeFiles) -> OnRuntimes:
    """The forms of one model on the requested runtimes; the runtime an artifact was made for
    is always included, also when not requested."""
    wanted = list(config.run.benchmark.backends)
    if deploy.backend is not None and deploy.backend not in wanted:
        wanted.insert(0, deploy.backend)
    files = {}
    for backend in wanted:
        if backend != "torch":
            path = runtimes.file_for(artifact, model, deploy, backend)  # before the model moves
            if path is not None:
                files[backend] = path
    if deploy.backend is None and "torch" in wanted:
        return OnRuntimes(deploy_model(model, deploy, hw), files)
    return OnRuntimes(None, files)


def reference_on_runtimes(deploy: Deployment, hw: Hardware, config, runtimes: RuntimeFiles,
                          backends: list[str]) -> OnRuntimes | None:
    """The reference artifact on the runtimes its model runs on (a float parent: all)."""
    loaded = load_reference(deploy, hw)
    if loaded is None:
        return None
    ref_model, ref_torch = loaded
    files = {b: path for b in backends if b != "torch"
             and (path := runtimes.file_for(Path(deploy.compare_to), ref_model,
                                            ref_torch.deploy, b)) is not None}
    return OnRuntimes(ref_torch if "torch" in backends else None, files)


def runtime_figures(target: OnRuntimes, backend: str, deploy: Deployment, data, config,
                    runtimes: RuntimeFiles) -> dict:
    """Top-1 (test split, the run's TTA), precision, peak memory and file of one runtime."""
    bcfg = config.run.benchmark
    threads = (bcfg.threads or [torch.get_num_threads()])[0]
    big = torch.randn(max(bcfg.batch_sizes), 3, *data.image_size)
    if backend == "torch":
        deployed = target.torch
        example = deployed.example(big)
        with torch.inference_mode():
            peak = peak_memory_bytes(lambda: deployed.scored(example),
                                     device=deployed.hw.torch_device)
        return {"accuracy": score(deployed, data, config), "peak_memory_bytes": peak,
                "precision": (deploy.precision if deploy.native
                              else deployed.hw.resolved_precision), "file": None}
    session = runtimes.session(target.files[backend], backend, threads)
    accuracy = evaluate(session, data.test_x, data.test_y, data, RUNTIME_HW,
                        tta=config.run.train.tta,
                        batch_size=min(config.run.train.eval_batch_size, len(data.test_y)))
    return {"accuracy": accuracy["accuracy"],
            "peak_memory_bytes": peak_memory_bytes(lambda: session(big)),
            "precision": deploy.precision if deploy.native else "fp32",
            "file": str(target.files[backend])}


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


def time_all(target: OnRuntimes, reference: OnRuntimes | None, data, config,
             runtimes: RuntimeFiles, out: dict) -> None:
    """Every (threads, batch size, runtime, mode) point into out["latency"], and the ratios to
    the reference into out["vs_reference"]: at each point all forms are timed interleaved."""
    bcfg = config.run.benchmark
    for threads in bcfg.threads or [torch.get_num_threads()]:
        with set_threads(threads):
            for bs in bcfg.batch_sizes:
                x = torch.randn(bs, 3, *data.image_size)
                forms, examples = {}, {}
                for role, on in (("model", target), ("reference", reference)):
                    for (backend, mode), fn in (on.forms(runtimes, threads).items()
                                                if on is not None else ()):
                        forms[(role, backend, mode)] = fn
                        examples[(role, backend, mode)] = on.example(backend, x)
                timed = measure_interleaved(forms, examples, warmup=bcfg.warmup,
                                            iters=bcfg.iters, min_time_s=bcfg.min_time_s,
                                            rounds=bcfg.rounds)
                record_point(target, timed, threads, out)


def record_point(target: OnRuntimes, timed: dict, threads: int, out: dict) -> None:
    """One (threads, batch) point's figures into `out`; a form the user deploys that is not
    faster than the reference's same form is flagged."""
    for (role, backend, mode), m in timed.items():
        if role != "model":
            continue
        out["latency"].append({"threads": threads, "backend": backend, "mode": mode, **m})
        log_point(backend, mode, threads, m)
        ref = timed.get(("reference", backend, mode))
        if ref is None:
            continue
        bs, ratio = m["batch_size"], m["latency_ms_p50"] / ref["latency_ms_p50"]
        out["vs_reference"]["points"].append(
            {"threads": threads, "batch_size": bs, "backend": backend, "mode": mode,
             "ratio": ratio, "latency_ms_p50": m["latency_ms_p50"],
             "reference_latency_ms_p50": ref["latency_ms_p50"]})
        log.info("  %-22s threads=%d batch=%-4d reference p50 %.3f ms -> ratio %.3f",
                 _form(backend, mode), threads, bs, ref["latency_ms_p50"], ratio)
        if ratio >= 1 and mode == target.deployed_mode(backend):
            out["flags"].append(f"not faster than {out['vs_reference']['artifact']} on "
                                f"{_form(backend, mode)} (batch {bs}, {threads} threads): "
                                f"ratio {ratio:.2f}")


def _form(backend: str, mode: str) -> str:
    return f"torch {mode}" if backend == "torch" else backend


def log_point(backend: str, mode: str, threads: int, m: dict) -> None:
    log.info("  %-22s threads=%d batch=%-4d p50 %.3f ms  p90 %.3f  p99 %.3f  %.0f img/s",
             _form(backend, mode), threads, m["batch_size"], m["latency_ms_p50"],
             m["latency_ms_p90"], m["latency_ms_p99"], m["throughput_ips"])
