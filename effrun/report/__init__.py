"""effrun-report: every summary.json below some run or multirun dirs, as one comparison.

collect(paths)  one row per stage per run: the run dir, its seed, the swept values (override keys
                whose values differ between the runs collected) and the stage's figures.
aggregate(rows) rows that differ only in seed become one: the mean, and a 95% confidence
                interval half-width (Student's t) in `<figure>_ci` when n >= 2. Each stage's
                accuracy delta against its parent stage (the run's previous stage) is paired
                within each run, so the interval is that of the delta, not of two accuracies;
                `delta_accuracy_noise` says when it contains 0.
pareto(rows)    which rows no other row beats on both accuracy (up) and batch-1 latency (down).
main()          writes report.csv, report.md, pareto.png, report.html and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

PROG = "effrun-report"
LABEL_KEYS = 4  # a point's label names at most this many swept keys (the csv has them all)
FIGURES = ("accuracy", "delta_accuracy", "params", "flops", "weight_bytes", "file_bytes",
           "latency_ms_p50_bs1", "latency_ms_p50_bs_max", "throughput_ips", "peak_memory_bytes",
           "sparsity")
# Two-sided 95% Student's t quantiles (t_0.975) by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
        17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069,
        24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


class ReportError(Exception):
    """A path the report cannot use; one line, exit code 2."""


def t975(df: int) -> float:
    """t_0.975 with df degrees of freedom: the table, else the Cornish-Fisher expansion around
    the normal quantile (error < 1e-3 beyond 30)."""
    if df in T975:
        return T975[df]
    z = statistics.NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"cannot read {path}: {err}") from None


def _overrides(run_dir: Path) -> dict[str, str]:
    """The last invocation's overrides as {key: value} (`+`/`++`/`~` prefixes dropped)."""
    history = run_dir / "invocations.jsonl"
    lines = history.read_text().splitlines() if history.is_file() else []
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        return {}
    out = {}
    for item in json.loads(lines[-1]).get("overrides") or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def _config_value(config: dict, key: str):
    node = config
    for part in key.replace("/", ".").split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _run_dirs(path: Path) -> list[Path]:
    found = sorted(p.parent for p in path.rglob("summary.json")) if path.is_dir() else []
    if path.is_file() and path.name == "summary.json":
        found = [path.parent]
    if not found:
        raise ReportError(f"no summary.json under {path}")
    return found


def collect(paths) -> list[dict]:
    """One row per stage per run, for every summary.json below the paths (each run once)."""
    runs, seen = [], set()
    for path in paths:
        for run_dir in _run_dirs(Path(path)):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            summary = _read_json(run_dir / "summary.json")
            config_file = run_dir / "config.json"
            config = _read_json(config_file) if config_file.is_file() else {}
            runs.append((run_dir, summary, config, _overrides(run_dir)))
    values = swept_values([(cfg, ov) for _, _, cfg, ov in runs])
    labels = _labels(values)
    if values and "name" in values[0]:
        # Several experiments: each labelled by its name and what differs among its own runs.
        labels = [""] * len(runs)
        for name in dict.fromkeys(v["name"] for v in values):
            idx = [i for i, v in enumerate(values) if v["name"] == name]
            own = _labels(swept_values([(runs[i][2], runs[i][3]) for i in idx]))
            for i, label in zip(idx, own, strict=True):
                labels[i] = ", ".join(filter(None, (name, label)))
    rows = []
    for (run_dir, summary, config, _), vals, label in zip(runs, values, labels, strict=True):
        # A run's records are its stages in order, one row per runtime: each stage's parent is
        # the stage before it on the same runtime; a row of another runtime than torch is
        # named <stage>@<runtime>.
        parent_accuracy: dict[str, float | None] = {}
        for rec in summary.get("records") or []:
            row = {"name": summary.get("name") or config.get("name"), "run_dir": str(run_dir),
                   "seed": config.get("seed"), "label": label or str(summary.get("name") or ""),
                   "swept": vals}
            row.update({k: v for k, v in rec.items() if k not in row})
            backend = rec.get("backend") or "torch"
            if backend != "torch":
                row["stage"] = f"{rec['stage']}@{backend}"
            accuracy, parent = rec.get("accuracy"), parent_accuracy.get(backend)
            row["delta_accuracy"] = (accuracy - parent if None not in (accuracy, parent)
                                     else None)
            parent_accuracy[backend] = accuracy
            rows.append(row)
    return rows


def _labels(values: list[dict[str, str]]) -> list[str]:
    """"lr=0.001, prune=l1" per run: the swept keys by their last part (whole when two end
    alike), at most LABEL_KEYS of them."""
    swept = list(values[0]) if values else []
    names = {k: k.rsplit(".", 1)[-1].rsplit("/", 1)[-1] for k in swept}
    if len(set(names.values())) < len(names):
        names = {k: k for k in swept}
    more = ", …" if len(swept) > LABEL_KEYS else ""
    return [", ".join(f"{names[k]}={v[k]}" for k in swept[:LABEL_KEYS]) + more for v in values]


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


def swept_values(runs: list[tuple[dict, dict[str, str]]]) -> list[dict[str, str]]:
    """Per run (config, overrides), {key: value} of the keys whose values differ between the
    runs, seed aside: the override keys first, then groups whose `_target_` differs (valued by
    the class name; their own fields left out), then any other config.json difference (runs
    without invocations.jsonl, or keys no override names)."""
    ov_keys = list(dict.fromkeys(k for _, ov in runs for k in ov if k != "seed"))
    covered = [k.replace("/", ".") for k in ov_keys]
    flats = [_flat(cfg) for cfg, _ in runs]
    diff = [k for k in dict.fromkeys(k for f in flats for k in f)
            if k != "seed" and len({f.get(k) for f in flats}) > 1
            and not any(k == c or k.startswith(c + ".") for c in covered)]
    groups = [k.removesuffix("._target_") for k in diff if k.endswith("._target_")]
    diff = [k for k in diff if not any(k.startswith(g + ".") for g in groups)]
    values = [{**{k: _value(cfg, ov, k) for k in ov_keys},
               **{g: str(f.get(g + "._target_", "–")).rsplit(".", 1)[-1] for g in groups},
               **{k: f.get(k, "–") for k in diff}}
              for (cfg, ov), f in zip(runs, flats, strict=True)]
    swept = [k for k in values[0] if len({v[k] for v in values}) > 1] if values else []
    return [{k: v[k] for k in swept} for v in values]


def _value(config: dict, overrides: dict[str, str], key: str) -> str:
    """A key's value in one run: the resolved config's when it is a plain value there (so
    `1e-3` and `0.001` agree), else the override's text (a group choice such as
    `model=resnet56`), else "default" (the run left it alone)."""
    value = _config_value(config, key)
    if value is not None and not isinstance(value, dict):
        return json.dumps(value) if isinstance(value, list) else str(value)
    return overrides.get(key, "default")


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows that differ only in seed as one row each: `n`, `seeds`, `run_dirs`, the mean of each
    figure and `<figure>_ci`, the 95% CI half-width t * s / sqrt(n) (None for n < 2)."""
    groups: dict = {}
    for row in rows:
        key = (row.get("name"), tuple(sorted(row["swept"].items())), row["stage"])
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        first = members[0]
        agg = {k: first.get(k) for k in ("name", "label", "swept", "stage", "latency_mode",
                                         "bs_max")}
        agg.update(n=len(members), seeds=[m.get("seed") for m in members],
                   run_dirs=[m["run_dir"] for m in members])
        for fig in FIGURES:
            vals = [m[fig] for m in members if isinstance(m.get(fig), int | float)]
            agg[fig] = (vals[0] if len(vals) == 1 else statistics.fmean(vals)) if vals else None
            agg[f"{fig}_ci"] = (t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
                                if len(vals) >= 2 else None)
        delta, ci = agg["delta_accuracy"], agg["delta_accuracy_ci"]
        # Within noise: the 95% interval of the paired delta contains 0 (unknown with one seed).
        agg["delta_accuracy_noise"] = None if ci is None else abs(delta) <= ci
        out.append(agg)
    return out


def latency(row: dict) -> float | None:
    """Batch-1 latency (ms), else the largest benchmarked batch's."""
    value = row.get("latency_ms_p50_bs1")
    return value if value is not None else row.get("latency_ms_p50_bs_max")


def pareto(rows: list[dict]) -> list[bool | None]:
    """Per row: True when no other row has accuracy >= and latency <= with one strictly better;
    None for a row without accuracy or latency."""
    pts = [(r.get("accuracy"), latency(r)) for r in rows]
    marks: list[bool | None] = []
    for acc, lat in pts:
        if acc is None or lat is None:
            marks.append(None)
            continue
        marks.append(not any(a is not None and t is not None and a >= acc and t <= lat
                             and (a > acc or t < lat) for a, t in pts))
    return marks


def report(paths, out: Path | None = None) -> tuple[list[dict], dict[str, Path]]:
    """Collect, aggregate, mark the Pareto rows and write the four files into `out`."""
    from effrun.report import data_curve, writers

    collected = collect(paths)
    rows = aggregate(collected)
    for row, mark in zip(rows, pareto(rows), strict=True):
        row["pareto"] = mark
    out = Path(out if out is not None else paths[0])
    if out.is_file():
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "report.csv", "md": out / "report.md", "png": out / "pareto.png",
             "html": out / "report.html"}
    writers.write_csv(rows, files["csv"])
    writers.write_md(rows, files["md"])
    writers.write_png(rows, files["png"])
    writers.write_html(rows, files["html"], files["png"])
    # Runs trained on several shares of their data: accuracy vs data (effrun/report/data_curve)
    files.update(data_curve.write(collected, out))
    return rows, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Compare effrun runs: every summary.json below the paths into "
        "report.csv, report.md, pareto.png and report.html, and a table of the Pareto front.")
    parser.add_argument("paths", nargs="+", type=Path,
                        help="run dirs, multirun (sweep) dirs or any folders above them")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report files (default: the first path)")
    args = parser.parse_args(argv)
    try:
        rows, files = report(args.paths, args.out)
    except (ReportError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    from effrun.report.writers import print_table

    print_table(rows)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
