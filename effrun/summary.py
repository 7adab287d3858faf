"""summary.json records (one per model-producing stage) and the rich table printed at the end."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def summarize(records, bench: list[dict] | None) -> list[dict]:
    """One row per model and runtime it was benchmarked on (its own runtime first), or one row
    per model when the benchmark did not run."""
    by_artifact = {b["artifact"]: b for b in bench or []}
    rows = []
    for rec in records:
        b = by_artifact.get(str(rec.artifact), {})
        for backend in b.get("backends") or [None]:
            rows.append(summary_row(rec, b, backend))
    return rows


def summary_row(rec, b: dict, backend: str | None) -> dict:
    """The row of one model (`rec`, its benchmark result `b`) on one runtime."""
    on = (b.get("backends") or {}).get(backend, {})
    row = {"stage": rec.stage, "backend": backend or "torch", "artifact": str(rec.artifact),
           "accuracy": on.get("accuracy", rec.metrics.get("accuracy")),
           "params": b.get("params", rec.metrics.get("params")),
           "flops": b.get("flops", rec.metrics.get("flops")),
           # The bytes of the tensors the deployed model reads, and its artifact file's size.
           "weight_bytes": b.get("weight_bytes", rec.metrics.get("weight_bytes")),
           "file_bytes": b.get("file_bytes", rec.metrics.get("file_bytes")),
           "precision": on.get("precision"),
           "latency_ms_p50_bs1": None, "latency_ms_p50_bs_max": None, "bs_max": None,
           "throughput_ips": None, "peak_memory_bytes": on.get("peak_memory_bytes"),
           # Zero-weight share of the pruned layers (magnitude / N:M pruning), measured from
           # the saved weights, and the stage's caveat (e.g. "no speed-up from zeros").
           "sparsity": rec.metrics.get("sparsity"), "note": rec.metrics.get("note")}
    points = [p for p in b.get("latency") or [] if p.get("backend", "torch") == row["backend"]]
    row.update(latency_fields(points))
    if b.get("vs_reference"):
        vs = b["vs_reference"]
        vs = {**vs, "points": [p for p in vs["points"]
                               if p.get("backend", "torch") == row["backend"]]}
        row["vs_reference"] = reference_ratios(vs, row.get("threads"))
    return row


def reference_ratios(vs: dict, threads: int | None) -> dict:
    """{"artifact", "mode", "ratios": {batch: latency / reference latency}} at the row's thread
    count, for the deployed (first-listed) mode."""
    points = [p for p in vs["points"] if p["threads"] == threads]
    mode = points[0]["mode"] if points else None
    return {"artifact": vs["artifact"], "mode": mode,
            # Keys as strings: what summary.json gives back (JSON object keys are strings).
            "ratios": {str(p["batch_size"]): p["ratio"] for p in points if p["mode"] == mode}}


def latency_fields(points: list[dict]) -> dict:
    """The row's latency figures at the first thread count: the compiled ones when they were
    measured (else eager; a runtime's own mode for onnxruntime/openvino) as the headline, and
    the eager ones beside them as `*_eager`."""
    if not points:
        return {}
    threads = points[0]["threads"]
    measured = list(dict.fromkeys(p["mode"] for p in points))
    modes = [m for m in ("compiled", "eager") if m in measured] or measured[:1]
    out: dict = {"threads": threads, "latency_mode": modes[0]}
    for mode in modes:
        by_batch = {p["batch_size"]: p for p in points
                    if p["threads"] == threads and p["mode"] == mode}
        bs_max = max(by_batch)
        suffix = "" if mode == modes[0] else "_eager"
        out[f"latency_ms_p50_bs1{suffix}"] = (by_batch[1]["latency_ms_p50"] if 1 in by_batch
                                              else None)
        out[f"latency_ms_p50_bs_max{suffix}"] = by_batch[bs_max]["latency_ms_p50"]
        out[f"throughput_ips{suffix}"] = by_batch[bs_max]["throughput_ips"]
        out["bs_max"] = bs_max
    return out


HEADLINE = ("stage", "accuracy", "weight_bytes", "file_bytes", "latency_ms_p50_bs1",
            "latency_ms_p50_bs_max", "throughput_ips")


def headline(rows: list[dict]) -> dict:
    """The figures of the run's final model on its own runtime (the last stage's first row),
    missing ones as None: what summary.json leads with and the CLI hands back to Hydra (a
    sweeper's objective)."""
    last = next((r for r in rows if r["stage"] == rows[-1]["stage"]), {}) if rows else {}
    return {k: last.get(k) for k in HEADLINE}


def fastest_deployable(rows: list[dict], tolerance: float) -> dict | None:
    """The fastest (stage, runtime) row at batch 1 and at the largest batch among the rows whose
    top-1 is within `tolerance` of the best row's: {"best_accuracy", "tolerance", "batch_1",
    "batch_max"}, each {"stage", "backend", "accuracy", "latency_ms_p50", "batch_size"}."""
    scored = [r for r in rows if r.get("accuracy") is not None]
    if not scored:
        return None
    best = max(r["accuracy"] for r in scored)
    eligible = [r for r in scored if r["accuracy"] >= best - tolerance - 1e-12]
    out: dict = {"best_accuracy": best, "tolerance": tolerance}
    for key, field_name in (("batch_1", "latency_ms_p50_bs1"),
                            ("batch_max", "latency_ms_p50_bs_max")):
        timed = [r for r in eligible if r.get(field_name) is not None]
        if timed:
            r = min(timed, key=lambda r: r[field_name])
            out[key] = {"stage": r["stage"], "backend": r["backend"], "accuracy": r["accuracy"],
                        "latency_ms_p50": r[field_name],
                        "batch_size": 1 if key == "batch_1" else r.get("bs_max")}
    return out


def _fmt(v, kind: str) -> str:
    if v is None:
        return "–"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "count":
        return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"
    if kind == "bytes":
        return f"{v / 2**20:.2f} MiB" if v >= 2**17 else f"{v / 1024:.1f} KiB"
    if kind == "ms":
        return f"{v:.3f}"
    return f"{v:,.0f}"


def print_summary(rows: list[dict], title: str = "effrun summary",
                  fastest: dict | None = None) -> None:
    table = Table(title=title)
    bs_max = next((r["bs_max"] for r in rows if r.get("bs_max")), None)
    cols = [("stage", "stage", "str"), ("accuracy", "top-1", "pct"), ("params", "params", "count"),
            ("flops", "FLOPs", "count"), ("weight_bytes", "weights", "bytes"),
            ("file_bytes", "file", "bytes"), ("latency_mode", "run as", "str"),
            ("latency_ms_p50_bs1", "ms bs 1", "ms"),
            ("latency_ms_p50_bs_max", f"ms bs {bs_max or 'max'}", "ms"),
            ("throughput_ips", f"img/s bs {bs_max or 'max'}", "int")]
    if any(r.get("sparsity") is not None for r in rows):
        cols.insert(2, ("sparsity", "sparsity", "pct"))
    if any(r.get("backend", "torch") != "torch" for r in rows):
        cols.insert(1, ("backend", "runtime", "str"))
    for _, header, kind in cols:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for r in rows:
        table.add_row(*[str(r.get(k) or "–") if kind == "str" else _fmt(r.get(k), kind)
                        for k, _, kind in cols])
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would wrap the table at 80 columns
        console = Console(width=130)
    console.print(table)
    for r in rows:
        if r.get("note") and r.get("backend", "torch") == rows_backend(rows, r["stage"]):
            console.print(f"{r['stage']}: {r['note']}")
        vs = r.get("vs_reference")
        if vs and vs["ratios"]:
            ratios = ", ".join(f"batch {bs}: {ratio:.2f}" for bs, ratio in vs["ratios"].items())
            form = vs["mode"] if r.get("backend", "torch") == "torch" else f"on {vs['mode']}"
            console.print(f"{r['stage']}: latency / its parent's, both {form} "
                          f"({Path(vs['artifact']).parent.name}): {ratios}")
    if fastest:
        console.print(fastest_line(fastest))


def rows_backend(rows: list[dict], stage: str) -> str:
    """The runtime of a stage's first row (its own)."""
    return next(r.get("backend", "torch") for r in rows if r["stage"] == stage)


def fastest_line(fastest: dict) -> str:
    picks = [f"batch {p['batch_size']}: {p['stage']} on {p['backend']} "
             f"({p['latency_ms_p50']:.3f} ms, {100 * p['accuracy']:.2f}%)"
             for key in ("batch_1", "batch_max") if (p := fastest.get(key))]
    return (f"fastest deployable within {100 * fastest['tolerance']:.1f} pt of the best top-1 "
            f"({100 * fastest['best_accuracy']:.2f}%): " + "; ".join(picks))
