"""summary.json records (one per model-producing stage) and the rich table printed at the end."""

from __future__ import annotations

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
        lat = b.get("latency") or []
        if lat:
            threads = lat[0]["threads"]
            # The headline figure is the compiled one when it was measured, else eager.
            mode = "compiled" if any(x["mode"] == "compiled" for x in lat) else "eager"
            for m in ("eager", "compiled") if mode == "compiled" else ("eager",):
                pts = {x["batch_size"]: x for x in lat if x["threads"] == threads
                       and x["mode"] == m}
                bs_max = max(pts)
                suffix = "" if m == mode else "_eager"
                row[f"latency_ms_p50_bs1{suffix}"] = pts[1]["latency_ms_p50"] if 1 in pts else None
                row[f"latency_ms_p50_bs_max{suffix}"] = pts[bs_max]["latency_ms_p50"]
                row[f"throughput_ips{suffix}"] = pts[bs_max]["throughput_ips"]
                row["bs_max"], row["threads"], row["latency_mode"] = bs_max, threads, mode
        rows.append(row)
    return rows


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
            ("file_bytes", "file", "bytes"),
            ("latency_ms_p50_bs1", "p50 ms (bs 1)", "ms"),
            ("latency_ms_p50_bs_max", f"p50 ms (bs {bs_max or 'max'})", "ms"),
            ("throughput_ips", "img/s", "int")]
    if any(r.get("sparsity") is not None for r in rows):
        cols.insert(2, ("sparsity", "sparsity", "pct"))
    for _, header, kind in cols:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for r in rows:
        table.add_row(*[str(r[k]) if kind == "str" else _fmt(r.get(k), kind)
                        for k, _, kind in cols])
    console = Console()
    console.print(table)
    for r in rows:
        if r.get("note"):
            console.print(f"{r['stage']}: {r['note']}")
