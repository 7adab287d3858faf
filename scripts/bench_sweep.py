"""A compression sweep with the stage cache on and off: wall time and identical results.

    python scripts/bench_sweep.py [--repeats 2] [--points 0.3 0.5 0.7] [overrides ...]

Each sweep runs `stages=[train,prune]` once per prune point (compression.prune.
target_macs_ratio), every run in its own run dir, in this process (effrun.pipeline.run). With
the cache on, the first point trains and the others reuse that training: a sweep costs one
baseline + one prune per point, against one of each per point without it. Every repeat uses a
fresh cache dir; repeats alternate which mode goes first (so neither always meets a warm
machine). Prints each sweep's wall time, the cached/uncached ratio (mean, min-max over the
repeats) against the floor the stages' own times set (one train + one prune per point over
a train + prune per point, from the uncached runs' stage.json seconds: what a cache with no
overhead would give), and whether every stage's accuracy (and params, FLOPs) is identical in
both modes.
Default config: the smoke study with 20 training epochs, so that training dominates the sweep
as it does in real studies (a baseline of tens of epochs, a short fine-tune per point). One
untimed run first warms the process up (imports, allocator, first-call costs), so that the first
timed sweep does not pay them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from effrun import pipeline
from effrun.schema import compose

BASE = ["+experiment=smoke", "stages=[train,prune]", "train.epochs=20"]
FIGURES = ("accuracy", "params", "flops")


def sweep(work: Path, cached: bool, points: list[float], extra: list[str]
          ) -> tuple[float, dict]:
    """One sweep: (wall seconds, {point: {stage: (accuracy, params, flops)}})."""
    results = {}
    start = time.perf_counter()
    for point in points:
        cfg = compose([*BASE, *extra, f"compression.prune.target_macs_ratio={point}",
                       f"cache.enabled={str(cached).lower()}", f"cache.dir={work / 'cache'}"])
        with contextlib.redirect_stdout(io.StringIO()):  # each run's summary table
            summary = pipeline.run(cfg, work / f"run_{point}")
        results[point] = {r["stage"]: tuple(r[f] for f in FIGURES) for r in summary}
    return time.perf_counter() - start, results


def floor_ratio(work: Path, points: list[float]) -> float:
    """(train + prune per point) / (train and prune per point), from an uncached sweep."""
    seconds = {s: statistics.mean(json.loads((work / f"run_{p}" / d / "stage.json").read_text())
                                  ["seconds"] for p in points)
               for s, d in (("train", "01_train"), ("prune", "02_prune"))}
    n = len(points)
    return (seconds["train"] + n * seconds["prune"]) / (n * (seconds["train"] + seconds["prune"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--points", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    args = parser.parse_args()
    print(f"sweep: {' '.join(BASE + args.overrides)} compression.prune.target_macs_ratio="
          f"{','.join(map(str, args.points))}")
    times: dict[bool, list[float]] = {True: [], False: []}
    reference, differences, floors = None, [], []
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        sweep(Path(tmp) / "warmup", False, args.points[:1], [*args.overrides, "train.epochs=1"])
        for rep in range(args.repeats):
            for cached in ((True, False) if rep % 2 == 0 else (False, True)):
                work = Path(tmp) / f"rep{rep}_{'cached' if cached else 'uncached'}"
                seconds, results = sweep(work, cached, args.points, args.overrides)
                times[cached].append(seconds)
                if not cached:
                    floors.append(floor_ratio(work, args.points))
                print(f"repeat {rep + 1}  {'cached  ' if cached else 'uncached'}  "
                      f"{seconds:7.1f} s")
                reference = reference or results
                differences += [f"repeat {rep + 1} {'cached' if cached else 'uncached'} point "
                                f"{p} {stage}: {results[p][stage]} vs {reference[p][stage]}"
                                for p in args.points for stage in results[p]
                                if results[p][stage] != reference[p][stage]]
    ratios = [c / u for c, u in zip(times[True], times[False], strict=True)]
    print(f"uncached {statistics.mean(times[False]):.1f} s, cached "
          f"{statistics.mean(times[True]):.1f} s (means over {args.repeats} repeats)")
    print(f"cached/uncached: {statistics.mean(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}; target <= 0.45); floor set by the stages' own times "
          f"{statistics.mean(floors):.3f}")
    for point in args.points:
        print(f"  point {point}: " + ", ".join(
            f"{stage} accuracy {figures[0]:.4f}" for stage, figures in reference[point].items()))
    if differences:
        print(f"DIFFERENT results in {len(differences)} stage(s):")
        print("\n".join(f"  {d}" for d in differences))
    else:
        print(f"identical {', '.join(FIGURES)} per stage in every sweep, cached and uncached")


if __name__ == "__main__":
    main()
