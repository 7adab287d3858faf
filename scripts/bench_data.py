"""Data pruning on CIFAR-10: a score-selected share vs a random share vs all of the data.

    python scripts/bench_data.py [--seeds 0 1 2] [--size 8000] [--keep 0.5] [--epochs 4]
                                 [--arms full random el2n:easy_first ...] [overrides ...]

Every arm trains the same model for the same epochs (stages=[train]) from the same seed on
`--size` class-balanced images of the CIFAR-10 copy ($EFFRUN_CIFAR10_JPEG, else
/work/shared/datasets/cifar10-jpeg; the arm "full"), or on the share `--keep` of them that
`select.method` keeps (random, or el2n/loss/forgetting with `select.order`, proxy runs of
`--proxy-epochs`). The arms run interleaved within each seed, in this process
(effrun.pipeline.run), each in its own run dir; the arms rotate from seed to seed, so no arm
always meets a warm machine.

Arms: `full`, `random`, `<method>:<order>` (el2n:easy_first). The arms of one seed share a
stage cache, so a second arm of the same method reuses the scores (not the training: every
arm's train key differs). Prints per arm: test top-1 mean ± std over the seeds [min-max], its
ratio to the full arm's mean, the training seconds (fit's epochs), the scoring's proxy-run
seconds, and the time ratios to the full arm (training alone, and training + proxy).
Wall-clock times on a shared machine: read them as ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from effrun import pipeline
from effrun.schema import compose

DATA = os.environ.get("EFFRUN_CIFAR10_JPEG", "/work/shared/datasets/cifar10-jpeg")


def arm_overrides(arm: str, args) -> list[str]:
    """`full`, `random`, or `<method>:<order>` (el2n:easy_first)."""
    if arm == "full":
        return []
    method, _, order = arm.partition(":")
    return [f"select.method={method}", f"select.keep={args.keep}",
            f"select.order={order or 'hard_first'}", f"select.proxy_epochs={args.proxy_epochs}"]


def run_arm(work: Path, arm: str, seed: int, args) -> dict:
    """One training run: its accuracy, training seconds and selection seconds."""
    run_dir = work / f"{arm}_seed{seed}"
    cfg = compose(["+experiment=cifar10_baseline", f"dataset.root={args.data}",
                   f"dataset.train_size={args.size}", "dataset.selection=class_balanced",
                   f"model={args.model}", f"train.epochs={args.epochs}",
                   f"train.batch_size={args.batch_size}", "train.tta=none", "train.eval_every=0",
                   "stages=[train]", "hardware=cpu", f"seed={seed}",
                   f"hardware.threads={args.threads}", f"cache.dir={work / f'cache_{seed}'}",
                   *arm_overrides(arm, args),
                   *args.overrides])
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's summary table
        pipeline.run(cfg, run_dir)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "01_train" / "metrics.json").read_text())
    train_s = metrics["train_seconds"]
    scores = (metrics.get("select") or {}).get("scores") or {}
    return {"accuracy": metrics["accuracy"], "train_s": train_s, "wall_s": wall,
            "train_cpu": sum(h["cpu_seconds"] for h in metrics["history"]),
            "images": (metrics.get("select") or {}).get("kept", args.size),
            "scores": scores.get("source"), "proxy_s": scores.get("proxy_seconds"),
            "proxy_cpu": scores.get("proxy_cpu_seconds"),
            # The run's wall time outside training: data, proxy runs and scoring, evaluation.
            "other_s": wall - train_s}


def spread(values: list[float], scale: float = 1.0, spec: str = ".2f") -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return (f"{mean:{spec}} ± {std:{spec}} [{min(values) * scale:{spec}}-"
            f"{max(values) * scale:{spec}}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+",
                        default=["full", "random", "el2n:easy_first", "el2n:hard_first"])
    parser.add_argument("--size", type=int, default=8000, help="images of the full arm")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--proxy-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="resnet20_slim")
    # One thread: on a machine shared by many processes, two threads per process wait on each
    # other at every parallel region (measured here 10x slower than one).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    args = parser.parse_args()
    print(f"bench_data: {args.model}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.threads} thread(s), full = {args.size} class-balanced CIFAR-10 train images, "
          f"keep {args.keep} (proxy {args.proxy_epochs} epochs), seeds {args.seeds}, "
          f"overrides {args.overrides}", flush=True)
    results: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    proxy_s: dict[tuple[int, str], float] = {}  # (seed, method): its scoring's seconds
    proxy_cpu: dict[tuple[int, str], float] = {}  # the same in CPU seconds
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for i, seed in enumerate(args.seeds):
            arms = args.arms[i % len(args.arms):] + args.arms[:i % len(args.arms)]
            for arm in arms:
                r = run_arm(Path(tmp), arm, seed, args)
                results[arm].append({**r, "seed": seed})
                if r["proxy_s"] is not None:
                    proxy_s[(seed, arm.partition(":")[0])] = r["proxy_s"]
                    proxy_cpu[(seed, arm.partition(":")[0])] = r["proxy_cpu"]
                print(f"  seed {seed} {arm:>16}: top-1 {r['accuracy']:.4f}, {r['images']} "
                      f"images, train {r['train_s']:.0f} s ({r['train_cpu']:.0f} CPU s), "
                      f"outside training {r['other_s']:.0f} s"
                      f"{', scores ' + r['scores'] if r['scores'] else ''}", flush=True)
    print(f"all runs: {time.perf_counter() - started:.0f} s wall")
    print_table(results, proxy_s, len(args.seeds), "train_s", "s")
    print_table(results, proxy_cpu, len(args.seeds), "train_cpu", "CPU s")


def print_table(results: dict[str, list[dict]], proxy_s: dict, seeds: int, train_key: str,
                unit: str) -> None:
    """The table, with times in `unit` (wall seconds or process CPU seconds)."""
    full = results.get("full")
    full_acc = statistics.fmean(r["accuracy"] for r in full) if full else None
    full_train = statistics.fmean(r[train_key] for r in full) if full else None
    print(f"\n| arm | images | top-1 % mean ± std [min-max] (n={seeds}) | vs full | train "
          f"{unit} | train / full | proxy {unit} | (train + proxy) / full |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for arm, rows in results.items():
        acc = [r["accuracy"] for r in rows]
        train = statistics.fmean(r[train_key] for r in rows)
        method = arm.partition(":")[0]
        proxy = [proxy_s[(r["seed"], method)] for r in rows if (r["seed"], method) in proxy_s]
        proxy_mean = statistics.fmean(proxy) if proxy else 0.0
        vs = f"{statistics.fmean(acc) / full_acc:.3f}" if full_acc else "–"
        ratio = f"{train / full_train:.2f}" if full_train else "–"
        total = f"{(train + proxy_mean) / full_train:.2f}" if full_train else "–"
        print(f"| {arm} | {rows[0]['images']} | {spread(acc, 100)} | {vs} | {train:.0f} | "
              f"{ratio} | {proxy_mean:.0f} | {total} |")
    print(f"\n(train {unit}: the train stage's epochs; proxy {unit}: the proxy runs and "
          "scoring of that method, paid once per seed: the arm of the same method that ran "
          "second reused the scores from the stage cache. On a machine shared with other "
          "jobs; CPU seconds are this process's, the steadier figure there.)")


if __name__ == "__main__":
    main()
