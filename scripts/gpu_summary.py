"""One line per run for scripts/gpu_check.sh: the train stage's seconds per epoch (the first
holds the warm-up), its total as stage.json records it, top-1, and the benchmark stage's
latency and peak memory per model; appended as JSON to a file as well.

Usage: python scripts/gpu_summary.py <run dir> [<json file to append to>]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def summarize(run_dir: Path) -> dict:
    train = read(run_dir / "01_train" / "metrics.json")
    epochs = [round(h["seconds"], 3) for h in train.get("history", [])]
    found = {"run": run_dir.name, "top1": train.get("accuracy"),
             "train_stage_s": read(run_dir / "01_train" / "stage.json").get("seconds"),
             "epoch_s": epochs,
             "first_epoch_s": epochs[0] if epochs else None,
             "later_epoch_s_median": sorted(epochs[1:])[len(epochs[1:]) // 2]
             if len(epochs) > 1 else None}
    for model in read(run_dir / "05_benchmark" / "metrics.json").get("models", []):
        points = {f"bs{p['batch_size']}_{p['mode']}": round(p["latency_ms_p50"], 3)
                  for p in model.get("latency", [])}
        found[f"bench_{model['stage']}"] = {"p50_ms": points,
                                           "peak_memory_mib": round(
                                               model.get("peak_memory_bytes", 0) / 2**20, 1),
                                           "precision": model.get("precision")}
    log = run_dir / "effrun.log"
    if log.is_file():
        found["torchrun"] = [line.split("| torchrun ")[1].strip()
                             for line in log.read_text().splitlines() if "| torchrun " in line]
    return found


def main() -> None:
    found = summarize(Path(sys.argv[1]))
    print(json.dumps(found))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "a") as out:
            out.write(json.dumps(found) + "\n")


if __name__ == "__main__":
    main()
