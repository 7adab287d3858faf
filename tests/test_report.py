"""effrun-report on hand-written run dirs (no training): collection, swept-value labels, the
Pareto front, mean ± 95% CI over seeds, the four files and the command line."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from effrun.report import aggregate, collect, main, pareto, report

STAGES = {"train": (0.80, 2.0, 1_000_000), "prune": (0.75, 1.5, 500_000),
          "quantize": (0.74, 1.8, 250_000)}


def record(stage: str, acc: float, lat: float | None, wbytes: int) -> dict:
    return {"stage": stage, "artifact": f"/x/{stage}/model.pt", "accuracy": acc, "params": 1000,
            "flops": 2000, "weight_bytes": wbytes, "file_bytes": wbytes + 100,
            "latency_ms_p50_bs1": lat, "latency_ms_p50_bs_max": None if lat is None else 9 * lat,
            "bs_max": None if lat is None else 64, "throughput_ips": None if lat is None else 7e3,
            "peak_memory_bytes": None, "latency_mode": None if lat is None else "eager"}


def make_run(run_dir: Path, overrides: list[str], seed: int = 0, lr: float = 0.1,
             records: list[dict] | None = None, name: str = "default") -> Path:
    run_dir.mkdir(parents=True)
    if records is None:
        records = [record(s, *v) for s, v in STAGES.items()]
    (run_dir / "summary.json").write_text(json.dumps(
        {"name": name, "run_dir": str(run_dir), "records": records, "headline": {}}))
    (run_dir / "config.json").write_text(json.dumps(
        {"name": name, "seed": seed, "optimizer": {"lr": lr, "momentum": 0.9},
         "train": {"epochs": 5}, "model": {"depth": 20}}))
    history = [{"time": "t0", "pid": 1, "overrides": ["stale=1"]},
               {"time": "t1", "pid": 2, "overrides": overrides}]
    (run_dir / "invocations.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return run_dir


def make_sweep(root: Path) -> Path:
    """outputs/default/multirun/<timestamp>/<job>/ with optimizer.lr swept over two values."""
    sweep = root / "outputs" / "default" / "multirun" / "2026-12-01_10-00-00"
    for job, lr in enumerate(("1e-3", "3e-3")):
        make_run(sweep / str(job), [f"optimizer.lr={lr}", "train.epochs=5"], lr=float(lr))
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - optimizer.lr=1e-3,3e-3\n    - train.epochs=5\n")
    return sweep


def test_collect_one_run_dir(tmp_path):
    run = make_run(tmp_path / "run", ["train.epochs=5"], seed=7)
    rows = collect([run])
    assert [r["stage"] for r in rows] == ["train", "prune", "quantize"]
    assert {r["run_dir"] for r in rows} == {str(run)}
    assert all(r["seed"] == 7 and r["swept"] == {} for r in rows)
    assert rows[0]["accuracy"] == 0.80 and rows[1]["weight_bytes"] == 500_000
    assert rows[0]["label"] == "default"  # nothing swept: the run's name


def test_collect_multirun_labels_by_swept_values(tmp_path):
    rows = collect([make_sweep(tmp_path)])
    assert len(rows) == 6
    # train.epochs is the same in both jobs, the stale first invocation is ignored
    # labelled by the resolved values (config.json), the same however the override spelled them
    assert {r["label"] for r in rows} == {"lr=0.001", "lr=0.003"}
    assert {r["swept"]["optimizer.lr"] for r in rows} == {"0.001", "0.003"}


def test_collect_two_paths_uses_config_for_missing_override(tmp_path):
    a = make_run(tmp_path / "a", ["optimizer.lr=0.5", "+compression/prune=l1"], lr=0.5)
    b = make_run(tmp_path / "b", [], lr=0.1)
    rows = collect([a, b, a])  # a path given twice is collected once
    assert len(rows) == 6
    labels = {r["run_dir"]: r["label"] for r in rows}
    # b has no override for lr: its value comes from its config.json; the prune group choice is
    # not a plain config value: a's override text against b's "default"
    assert labels[str(a)] == "lr=0.5, prune=l1"
    assert labels[str(b)] == "lr=0.1, prune=default"


def test_collect_config_differences_without_history(tmp_path):
    """Runs without invocations.jsonl: the swept values are the config.json differences; a
    changed group is named by its class, its own fields left out."""
    for name, target, sizes in (("a", "effrun.optim.SGD", [1, 64]),
                                ("b", "effrun.optim.AdamW", [1, 8])):
        run = make_run(tmp_path / name, [])
        (run / "invocations.jsonl").unlink()
        cfg = json.loads((run / "config.json").read_text())
        cfg["optimizer"] = {"_target_": target, "lr": 0.1 if name == "a" else 0.01}
        cfg["benchmark"] = {"batch_sizes": sizes, "iters": 30}
        cfg["seed"] = 0 if name == "a" else 1
        (run / "config.json").write_text(json.dumps(cfg))
    rows = collect([tmp_path])
    assert {r["label"] for r in rows} == {"optimizer=SGD, batch_sizes=[1, 64]",
                                          "optimizer=AdamW, batch_sizes=[1, 8]"}
    assert len(aggregate(rows)) == 6  # different configs are never averaged


def test_labels_of_several_experiments(tmp_path):
    """Runs of different experiments: the name, then what differs among that name's runs."""
    make_run(tmp_path / "a1", ["optimizer.lr=0.1"], name="alpha", lr=0.1)
    make_run(tmp_path / "a2", ["optimizer.lr=0.2"], name="alpha", lr=0.2)
    make_run(tmp_path / "b", ["optimizer.lr=0.1"], name="beta", lr=0.1)
    labels = {Path(r["run_dir"]).name: r["label"] for r in collect([tmp_path])}
    assert labels == {"a1": "alpha, lr=0.1", "a2": "alpha, lr=0.2", "b": "beta"}


def test_pareto_hand_made():
    rows = [{"accuracy": 0.90, "latency_ms_p50_bs1": 3.0},   # best accuracy: front
            {"accuracy": 0.85, "latency_ms_p50_bs1": 1.0},   # fastest: front
            {"accuracy": 0.85, "latency_ms_p50_bs1": 2.0},   # beaten by row 1
            {"accuracy": 0.80, "latency_ms_p50_bs1": 3.5},   # beaten by all
            {"accuracy": 0.88, "latency_ms_p50_bs1": None,   # falls back to the bs_max latency
             "latency_ms_p50_bs_max": 2.5},
            {"accuracy": 0.95, "latency_ms_p50_bs1": None}]  # no latency: not judged
    assert pareto(rows) == [True, True, False, False, True, None]


def test_mean_and_ci_over_three_seeds(tmp_path):
    accs = [0.70, 0.74, 0.75]
    for seed, acc in enumerate(accs):
        make_run(tmp_path / f"s{seed}", [f"seed={seed}", "optimizer.lr=0.1"], seed=seed,
                 records=[record("train", acc, 2.0 + seed, 1000)])
    make_run(tmp_path / "other", ["seed=0", "optimizer.lr=0.2"], lr=0.2,
             records=[record("train", 0.5, 1.0, 1000)])
    agg = aggregate(collect([tmp_path]))
    assert len(agg) == 2
    row = next(r for r in agg if r["n"] == 3)
    assert sorted(row["seeds"]) == [0, 1, 2] and row["label"] == "lr=0.1"
    mean = sum(accs) / 3  # 0.73
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / 2)  # sqrt(0.0007)
    assert row["accuracy"] == pytest.approx(0.73)
    assert row["accuracy_ci"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t_0.975, df 2
    assert row["accuracy_ci"] == pytest.approx(0.0657, abs=1e-4)
    assert row["latency_ms_p50_bs1"] == pytest.approx(3.0)
    assert row["latency_ms_p50_bs1_ci"] == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    single = next(r for r in agg if r["n"] == 1)
    assert single["accuracy"] == 0.5 and single["accuracy_ci"] is None
    report([tmp_path], tmp_path / "out")  # the plot draws the CIs as error bars
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| lr=0.1 | train | 3 | 73.00 ± 6.57% | – | 1,000 | 1.0 KiB | 3.000 ± 2.484 |" in md


def test_t_quantile_beyond_table():
    from effrun.report import t975

    assert t975(2) == 4.303
    assert t975(60) == pytest.approx(2.000, abs=2e-3)
    assert t975(10_000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-3)


def test_report_writes_four_files(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    make_run(tmp_path / "nobench", ["optimizer.lr=1e-2"], lr=1e-2,
             records=[record("train", 0.6, None, 1000)])
    out = tmp_path / "report"
    assert main([str(sweep), str(tmp_path / "nobench"), "--out", str(out)]) == 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7
    assert {r["optimizer.lr"] for r in table} == {"0.001", "0.003", "0.01"}  # a swept column
    nobench = next(r for r in table if r["label"] == "lr=0.01")
    assert nobench["latency_ms_p50_bs1"] == "" and nobench["pareto"] == ""
    marks = {(r["label"], r["stage"]): r["pareto"] for r in table}
    assert marks[("lr=0.001", "train")] == "True" and marks[("lr=0.001", "prune")] == "True"
    assert marks[("lr=0.001", "quantize")] == "False"
    md = (out / "report.md").read_text()
    assert "| ★ | lr=0.001 | train |" in md and "lr=0.01" in md
    page = (out / "report.html").read_text()
    png64 = base64.b64encode((out / "pareto.png").read_bytes()).decode()
    assert f"data:image/png;base64,{png64}" in page
    assert "<table>" in page and "lr=0.003" in page and "addEventListener" in page
    printed = capsys.readouterr().out
    assert "★" in printed and "lr=0.001" in printed and "report.html" in printed


def test_default_out_is_first_path(tmp_path):
    run = make_run(tmp_path / "run", [])
    report([run])
    assert {p.name for p in run.iterdir()} >= {"report.csv", "report.md", "pareto.png",
                                                 "report.html"}


def test_no_summary_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"effrun-report: error: no summary.json under {tmp_path / 'empty'}\n"


def _env():
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_python_m_runs(tmp_path):
    run = make_run(tmp_path / "run", [])
    done = subprocess.run([sys.executable, "-m", "effrun.report", str(run)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run / "report.html").is_file() and "train" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "effrun.report", str(tmp_path / "nope")],
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"effrun-report: error: no summary.json under {tmp_path}/nope"


def test_console_script_help():
    exe = shutil.which("effrun-report") or str(Path(sys.executable).parent / "effrun-report")
    if not Path(exe).exists():
        pytest.skip("effrun-report is not installed (pip install -e .)")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: effrun-report" in done.stdout


def test_delta_against_parent_is_paired_within_each_run(tmp_path):
    """The prune stage loses exactly 2 points in every seed while the seeds' accuracies spread
    widely: the paired delta is -2 pp with a tiny interval (not noise); quantize's changes of
    +0.5/-0.5/+0.1 pp are noise."""
    trains = [0.70, 0.80, 0.75]
    for seed, (acc, q) in enumerate(zip(trains, (0.005, -0.005, 0.001), strict=True)):
        prune = acc - 0.02 + 1e-4 * seed
        make_run(tmp_path / f"s{seed}", [f"seed={seed}"], seed=seed,
                 records=[record("train", acc, 2.0, 1000), record("prune", prune, 1.5, 500),
                          record("quantize", prune + q, 1.0, 250)])
    rows = {r["stage"]: r for r in aggregate(collect([tmp_path]))}
    assert rows["train"]["delta_accuracy"] is None and rows["train"]["delta_accuracy_noise"] is None
    assert rows["prune"]["delta_accuracy"] == pytest.approx(-0.0199)
    assert rows["prune"]["delta_accuracy_ci"] == pytest.approx(4.303 * 1e-4 / math.sqrt(3))
    assert rows["prune"]["delta_accuracy_noise"] is False
    assert rows["prune"]["accuracy_ci"] > 0.1  # unpaired, the seeds' spread would hide it
    assert rows["quantize"]["delta_accuracy_noise"] is True
    report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| prune | 3 | 73.01 ± 12.43% | -1.99 ± 0.02 pp |" in md
    assert " pp (noise) |" in md.split("| quantize |")[1].splitlines()[0]


def test_callback_reports_a_run_and_a_sweep(tmp_path):
    """The Hydra callback config.yaml installs: a finished run gets its report in its own dir,
    a failed one (no summary.json) none; a multirun gets one over all its jobs."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from effrun.schema import config_dir

    root = OmegaConf.load(Path(config_dir()) / "config.yaml")
    callback = instantiate(root.hydra.callbacks.report)
    run = make_run(tmp_path / "run", [])
    failed = tmp_path / "failed"
    failed.mkdir()
    for path in (run, failed):
        done = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(path)}}})
        callback.on_run_end(OmegaConf.create({}), job_return=type("R", (), {"hydra_cfg": done}))
    assert (run / "report.html").is_file() and not (failed / "report.html").exists()
    sweep = make_sweep(tmp_path / "s")
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    with open(sweep / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
