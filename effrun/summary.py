"""summary.json records (one per model-producing stage) and the rich table printed at the end."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def summarize(records, bench: list[dict] | None) -> list[dict]:
    by_artifact = {b["artifact"]: b for b in bench or []}
    rows = []
    for rec in records:
        b = by_artifact.get(str(rec.artifact), {})
        row = {"stage": rec.stage, "artifact": str(rec.artifact),
               "accuracy": b.get("accuracy", rec.metrics.get("accuracy")),
               "params": b.get("params", rec.metrics.get("params")),
               "flops": b.get("flops", rec.metrics.get("flops")),
               # The bytes of the tensors the deployed model reads, and its artifact file's size.
               "weight_bytes": b.get("weight_bytes", rec.metrics.get("weight_bytes")),
               "file_bytes": b.get("file_bytes", rec.metrics.get("file_bytes")),
               "latency_ms_p50_bs1": None, "latency_ms_p50_bs_max": None, "bs_max": None,
               "throughput_ips": None, "peak_memory_bytes": b.get("peak_memory_bytes"),
               # Zero-weight share of the pruned layers (magnitude / N:M pruning), measured from
               # the saved weights, and the stage's caveat (e.g. "no speed-up from zeros").
               "sparsity": rec.metrics.get("sparsity"), "note": rec.metrics.get("note")}
        row.update(latency_fields(b.get("latency") or []))
        if b.get("vs_reference"):
            row["vs_reference"] = reference_ratios(b["vs_reference"], row.get("threads"))
        rows.append(row)
    return rows


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
    measured (else eager) as the headline, and the eager ones beside them as `*_eager`."""
    if not points:
        return {}
    threads = points[0]["threads"]
    modes = [m for m in ("compiled", "eager") if any(p["mode"] == m for p in points)]
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
    """The figures of the run's final model (the last row), missing ones as None: what
    summary.json leads with and the CLI hands back to Hydra (a sweeper's objective)."""
    last = rows[-1] if rows else {}
    return {k: last.get(k) for k in HEADLINE}


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


def print_summary(rows: list[dict], title: str = "effrun summary") -> None:
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
    for _, header, kind in cols:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for r in rows:
        table.add_row(*[str(r.get(k) or "–") if kind == "str" else _fmt(r.get(k), kind)
                        for k, _, kind in cols])
    console = Console()
    if not console.is_terminal:  # a log or a pipe: rich would wrap the table at 80 columns
        console = Console(width=120)
    console.print(table)
    for r in rows:
        if r.get("note"):
            console.print(f"{r['stage']}: {r['note']}")
        vs = r.get("vs_reference")
        if vs and vs["ratios"]:
            ratios = ", ".join(f"batch {bs}: {ratio:.2f}" for bs, ratio in vs["ratios"].items())
            console.print(f"{r['stage']}: latency / its parent's, both {vs['mode']} "
                          f"({Path(vs['artifact']).parent.name}): {ratios}")
