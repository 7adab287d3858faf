"""The report's files (csv, md, png, html) and its rich table, from aggregated rows."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from effrun.report import FIGURES, latency

COLUMNS = ("label", "name", "stage", "n", "seeds", "pareto", *(
    c for f in FIGURES for c in (f, f"{f}_ci")), "delta_accuracy_noise", "latency_mode",
    "bs_max", "run_dirs")
# (key, header, kind) of the human-facing tables (md, html, terminal).
SHOWN = (("label", "run", "str"), ("stage", "stage", "str"), ("n", "n", "int"),
         ("accuracy", "top-1", "pct"), ("delta_accuracy", "Δ top-1 vs parent", "pp"),
         ("params", "params", "count"),
         ("weight_bytes", "weights", "bytes"), ("latency_ms_p50_bs1", "ms bs 1", "ms"),
         ("latency_ms_p50_bs_max", "ms bs max", "ms"), ("throughput_ips", "img/s bs max", "int"))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(v) for v in value)
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    """Every column, raw numbers; a missing figure is an empty cell."""
    swept = list(dict.fromkeys(k for r in rows for k in r.get("swept") or {}))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS[:2], *swept, *COLUMNS[2:]])
        for r in rows:
            values = [(r.get("swept") or {}).get(k) for k in swept]
            writer.writerow([_cell(v) for v in (*[r.get(c) for c in COLUMNS[:2]], *values,
                                                *[r.get(c) for c in COLUMNS[2:]])])


def fmt(row: dict, key: str, kind: str) -> str:
    """A figure for people: the mean, and ± its 95% CI half-width when there is one."""
    v, ci = row.get(key), row.get(f"{key}_ci")
    if v is None:
        return "–"
    if kind == "str":
        return str(v)
    if kind == "count":
        kind = "M" if v >= 1e5 else "int"
    if kind == "bytes":
        kind = "MiB" if v >= 2**17 else "KiB"
    scale, spec, unit = {"pct": (100, ".2f", "%"), "pp": (100, "+.2f", " pp"),
                         "M": (1e-6, ".2f", "M"),
                         "MiB": (2**-20, ".2f", " MiB"), "KiB": (2**-10, ".1f", " KiB"),
                         "ms": (1, ".3f", ""), "int": (1, ",.0f", "")}[kind]
    text = f"{v * scale:{spec}}"
    if ci:  # none for one seed; a figure every seed shares (params, bytes) shows no ± 0
        text += f" ± {ci * scale:{spec.lstrip('+')}}"
    text += unit
    if kind == "pp" and row.get(f"{key}_noise"):
        text += " (noise)"
    return text


def _mark(row: dict) -> str:
    return "★" if row.get("pareto") else ""


def write_md(rows: list[dict], path: Path) -> None:
    lines = ["| pareto | " + " | ".join(h for _, h, _ in SHOWN) + " |",
             "|---|" + "|".join("---" if k == "str" else "---:" for _, _, k in SHOWN) + "|"]
    for r in rows:
        cells = [_mark(r)] + [fmt(r, key, kind).replace("|", "\\|") for key, _, kind in SHOWN]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n★ = on the Pareto front (accuracy up, batch-1 latency down). With repeated seeds "
            "a figure is the mean ± the 95% confidence interval half-width (Student's t); "
            "Δ top-1 is each stage's accuracy minus its parent stage's in the same run, and "
            "(noise) marks a delta whose interval contains 0.\n")
    path.write_text("\n".join(lines) + "\n" + note)


def write_png(rows: list[dict], path: Path) -> None:
    """Accuracy vs latency, marker area ∝ deployed weight bytes, the Pareto front as a line,
    each point labelled by its swept values and stage; rows without latency left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("accuracy") is not None and latency(r) is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    def deployed(r):  # bytes the model reads when it runs; older summaries: its file
        return r.get("weight_bytes") or r.get("file_bytes") or 0

    biggest = max((deployed(r) for r in pts), default=0) or 1
    for r in pts:
        size = 30 + 400 * deployed(r) / biggest
        x, y = latency(r), 100 * r["accuracy"]
        x_ci = r.get("latency_ms_p50_bs1_ci" if r.get("latency_ms_p50_bs1") is not None
                     else "latency_ms_p50_bs_max_ci")
        if r.get("accuracy_ci") is not None or x_ci is not None:
            y_ci = r.get("accuracy_ci")
            ax.errorbar(x, y, yerr=None if y_ci is None else 100 * y_ci, xerr=x_ci, fmt="none",
                        ecolor="grey", capsize=3, zorder=1)
        ax.scatter(x, y, s=size, alpha=0.6, zorder=2,
                   color="tab:red" if r.get("pareto") else "tab:blue", edgecolors="black")
    for r, (x, y), k in zip(pts, _points(pts), _label_rows(_points(pts)), strict=True):
        text = f"{r['label']} · {r['stage']}" if r.get("label") else r["stage"]
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6 + 9 * k), fontsize=7)
    front = sorted((latency(r), 100 * r["accuracy"]) for r in pts if r.get("pareto"))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
                linewidth=1.2, label="Pareto front", zorder=3)
        ax.legend(loc="lower right")
    lats = [latency(r) for r in pts]
    if lats and min(lats) > 0 and max(lats) / min(lats) > 20:
        ax.set_xscale("log")
    elif pts:
        # The axes follow the points, not the error bars: with two seeds a 95% interval can
        # span more than the whole plot (t = 12.7); its bars then run off the edge.
        ax.set_xlim(*_padded([x for x, _ in _points(pts)], floor=0.0))
    if pts:
        ax.set_ylim(*_padded([y for _, y in _points(pts)], floor=0.0, ceiling=100.0))
    ax.set_xlabel("latency, ms p50 at batch 1 (largest batch where batch 1 is missing)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("accuracy vs latency (marker size = deployed bytes)")
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no run with latency figures", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _points(rows: list[dict]) -> list[tuple[float, float]]:
    return [(latency(r), 100 * r["accuracy"]) for r in rows]


def _label_rows(points: list[tuple[float, float]]) -> list[int]:
    """Per point, how many earlier points lie close enough that their labels would overlap
    (within 4% of the axis spans): its label is raised by that many lines."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x = (max(xs) - min(xs)) or 1.0 if xs else 1.0
    span_y = (max(ys) - min(ys)) or 1.0 if ys else 1.0
    return [sum(abs(x - px) < 0.04 * span_x and abs(y - py) < 0.04 * span_y
                for px, py in points[:i]) for i, (x, y) in enumerate(points)]


def _padded(values: list[float], floor: float | None = None,
            ceiling: float | None = None) -> tuple[float, float]:
    """Axis limits around `values` with room for labels, kept within [floor, ceiling]."""
    lo, hi = min(values), max(values)
    pad = 0.15 * (hi - lo) or 0.1 * abs(hi) or 1.0
    lo, hi = lo - pad, hi + 2 * pad  # labels sit above their points
    return (lo if floor is None else max(floor, lo), hi if ceiling is None else min(ceiling, hi))


SORT_JS = """
document.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const asc = th.dataset.dir !== "asc";
  th.closest("tr").querySelectorAll("th").forEach(h => delete h.dataset.dir);
  th.dataset.dir = asc ? "asc" : "desc";
  const key = td => td.dataset.v !== undefined && td.dataset.v !== "" ? parseFloat(td.dataset.v)
                                                                      : td.textContent;
  [...body.rows].sort((a, b) => {
    const x = key(a.cells[col]), y = key(b.cells[col]);
    const c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(y);
    return asc ? c : -c;
  }).forEach(r => body.appendChild(r));
}));
"""


def write_html(rows: list[dict], path: Path, png: Path) -> None:
    """One self-contained file: the plot embedded as base64, the table sortable by a click on
    a header (numbers sort by value)."""
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    head = "<tr><th>pareto</th>" + "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in SHOWN)
    body = []
    for r in rows:
        cells = [f'<td data-v="{1 if r.get("pareto") else 0}">{_mark(r)}</td>']
        for key, _, kind in SHOWN:
            v = r.get(key)
            num = "" if kind == "str" or v is None else f' data-v="{v}"'
            cells.append(f"<td{num}>{html.escape(fmt(r, key, kind))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>effrun report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;white-space:nowrap}}
th{{cursor:pointer;background:#eee}}
td[data-v]{{text-align:right}} th[data-dir=asc]::after{{content:" ▲"}}
th[data-dir=desc]::after{{content:" ▼"}}</style></head>
<body><h1>effrun report</h1>
<img alt="accuracy vs latency" src="data:image/png;base64,{image}">
<p>★ = on the Pareto front (accuracy up, batch-1 latency down); with repeated seeds a figure is
the mean ± the 95% confidence interval half-width. Δ top-1 is each stage's accuracy minus its
parent stage's in the same run; (noise) marks a delta whose interval contains 0. Click a header
to sort.</p>
<table><thead>{head}</tr></thead><tbody>
{chr(10).join(body)}
</tbody></table>
<script>{SORT_JS}</script></body></html>
"""
    path.write_text(page)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="effrun report (★ = Pareto-optimal: accuracy up, batch-1 latency down)")
    table.add_column("pareto", justify="center")
    for _, header, kind in SHOWN:
        table.add_column(header, justify="left" if kind == "str" else "right")
    for r in rows:
        table.add_row(_mark(r), *[escape(fmt(r, key, kind)) for key, _, kind in SHOWN])
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
