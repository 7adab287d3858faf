"""The report's accuracy-vs-data section: top-1 against the share of training data used.

Written beside the report (data_curve.csv, data_curve.md, data_curve.png) when the runs
collected trained on different shares of their data: a sweep over `select.keep` and
`select.method` (the data_curve presets), or over `dataset.train_fraction`.

- Each run's train stage is one point. Its data share is `select.keep` (when a selection
  method keeps a share) times `dataset.train_fraction`, read from the run's config.json.
- Its line is the selection method, `random`, or a score with its order (`el2n hard_first`);
  runs without one are `all data` at their train_fraction (`dataset <selection>` below 1).
  Other swept keys (seed and the data keys aside) are added to the line's name.
- Points of a line at one share over several seeds become one: the mean top-1, its standard
  deviation and min-max (the plot's error bars: ± 1 std), the 95% CI half-width (csv), and
  the mean training seconds of the train stage (01_train/metrics.json).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

# Swept keys that place a point on the curve, not on another line.
DATA_KEYS = ("select.keep", "select.method", "select.order", "dataset.train_fraction", "seed")
COLUMNS = ("line", "fraction", "n", "seeds", "accuracy", "accuracy_std", "accuracy_ci",
           "accuracy_min", "accuracy_max", "train_seconds", "images")


def _read(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def curve_points(rows: list[dict]) -> list[dict]:
    """One point per run's train stage (report rows from `collect`): its line, data share,
    seed, top-1, training seconds and the images it trained on."""
    points = []
    for row in rows:
        if row.get("stage") != "train" or row.get("accuracy") is None:
            continue
        run_dir = Path(row["run_dir"])
        config = _read(run_dir / "config.json")
        select, dataset = config.get("select") or {}, config.get("dataset") or {}
        method, keep = select.get("method", "none"), select.get("keep", 1.0)
        base = dataset.get("train_fraction", 1.0)
        if method == "none":
            line = "all data" if base >= 1 else f"dataset {dataset.get('selection', 'stratified')}"
            keep = 1.0
        else:
            line = method if method == "random" else f"{method} {select.get('order', '')}".strip()
        others = {k: v for k, v in (row.get("swept") or {}).items() if k not in DATA_KEYS}
        if others:
            line += " · " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in others.items())
        metrics = _read(run_dir / "01_train" / "metrics.json")
        points.append({"line": line, "fraction": round(keep * base, 6), "seed": row.get("seed"),
                       "accuracy": row["accuracy"],
                       "train_seconds": metrics.get("train_seconds"),
                       "images": (metrics.get("select") or {}).get("kept")})
    return points


def aggregate_points(points: list[dict]) -> list[dict]:
    """Points of one line at one share as one: mean, std, min, max, 95% CI over the seeds."""
    from effrun.report import t975

    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["line"], p["fraction"]), []).append(p)
    out = []
    for (line, fraction), members in sorted(groups.items()):
        acc = [m["accuracy"] for m in members]
        seconds = [m["train_seconds"] for m in members if m["train_seconds"] is not None]
        images = [m["images"] for m in members if m["images"] is not None]
        std = statistics.stdev(acc) if len(acc) > 1 else None
        out.append({"line": line, "fraction": fraction, "n": len(acc),
                    "seeds": [m["seed"] for m in members], "accuracy": statistics.fmean(acc),
                    "accuracy_std": std,
                    "accuracy_ci": None if std is None else t975(len(acc) - 1) * std
                    / math.sqrt(len(acc)),
                    "accuracy_min": min(acc), "accuracy_max": max(acc),
                    "train_seconds": statistics.fmean(seconds) if seconds else None,
                    "images": round(statistics.fmean(images)) if images else None})
    return out


def write(rows: list[dict], out: Path) -> dict[str, Path]:
    """data_curve.{csv,md,png} into `out` when the runs trained on more than one data share
    (else nothing); returns the files written."""
    curve = aggregate_points(curve_points(rows))
    if len({c["fraction"] for c in curve}) < 2:
        return {}
    files = {"curve_csv": out / "data_curve.csv", "curve_md": out / "data_curve.md",
             "curve_png": out / "data_curve.png"}
    write_csv(curve, files["curve_csv"])
    write_md(curve, files["curve_md"])
    write_png(curve, files["curve_png"])
    return files


def write_csv(curve: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for c in curve:
            writer.writerow(["" if c[k] is None else ";".join(map(str, c[k]))
                             if isinstance(c[k], list) else c[k] for k in COLUMNS])


def write_md(curve: list[dict], path: Path) -> None:
    lines = ["| selection | data % | n | top-1 % mean ± std [min-max] | train s | images |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in curve:
        acc = f"{100 * c['accuracy']:.2f}"
        if c["accuracy_std"] is not None:
            acc += (f" ± {100 * c['accuracy_std']:.2f} [{100 * c['accuracy_min']:.2f}-"
                    f"{100 * c['accuracy_max']:.2f}]")
        seconds = "–" if c["train_seconds"] is None else f"{c['train_seconds']:.1f}"
        images = "–" if c["images"] is None else str(c["images"])
        lines.append(f"| {c['line']} | {100 * c['fraction']:g} | {c['n']} | {acc} | {seconds} "
                     f"| {images} |")
    path.write_text("\n".join(lines) + "\n\nOne row per selection and share of the training "
                    "data; over seeds, the mean ± the standard deviation [min-max]. train s: "
                    "the train stage's epochs (proxy runs not included).\n")


def write_png(curve: list[dict], path: Path) -> None:
    """Top-1 against the data share (log axis), one line per selection, ± 1 std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=110)
    for line in dict.fromkeys(c["line"] for c in curve):
        pts = [c for c in curve if c["line"] == line]
        ax.errorbar([100 * p["fraction"] for p in pts], [100 * p["accuracy"] for p in pts],
                    yerr=[100 * (p["accuracy_std"] or 0) for p in pts], marker="o",
                    capsize=3, label=line)
    ax.set_xscale("log")
    ticks = sorted({100 * c["fraction"] for c in curve})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training data kept (log scale)")
    ax.set_ylabel("top-1 accuracy, %")
    ax.set_title("accuracy vs training data (mean ± 1 std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
