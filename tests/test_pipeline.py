"""The pipeline end to end on synthetic data: artifacts, metrics, summary, resume, round trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, compose_cfg, run_cli, run_cli_here

from effrun import pipeline
from effrun.artifacts import load_model, read_model_file
from effrun.errors import EffrunError
from effrun.schema import validate


def test_smoke_pipeline_end_to_end(smoke_run):
    run_dir, summary = smoke_run
    train_dir = run_dir / "01_train"
    for name in ("model.pt", "metrics.json", "stage.json", "checkpoint.pt"):
        assert (train_dir / name).is_file(), name
    bench = json.loads((run_dir / "05_benchmark" / "metrics.json").read_text())
    assert bench["models"][0]["latency"], "benchmark measured latencies"
    stage = json.loads((train_dir / "stage.json").read_text())
    assert stage["stage"] == "train" and stage["versions"]["torch"] == torch.__version__
    assert stage["model_config"]["_target_"].endswith("CifarResNet")
    written = json.loads((run_dir / "summary.json").read_text())
    s = written["records"]
    assert s == summary
    assert written["headline"]["stage"] == "quantize"
    assert written["headline"]["accuracy"] == s[-1]["accuracy"]
    assert [r["stage"] for r in s] == ["train", "prune", "distill", "quantize"]
    for rec in s:
        for key in ("stage", "accuracy", "params", "weight_bytes", "file_bytes",
                    "latency_ms_p50_bs1", "latency_ms_p50_bs_max", "throughput_ips"):
            assert rec[key] is not None, (rec["stage"], key)
        assert rec["bs_max"] == 8
    assert s[0]["accuracy"] > 0.3, "synthetic data is learnable: well above 10% chance"
    assert s[0]["params"] > 200_000 and s[0]["flops"] > 0
    assert s[1]["flops"] < s[0]["flops"], "channel pruning removes MACs"
    assert s[3]["weight_bytes"] < s[2]["weight_bytes"], "int8 is smaller than its float parent"
    for n, stage in enumerate(["train", "prune", "distill", "quantize"], start=1):
        assert (run_dir / f"0{n}_{stage}" / "stage.json").is_file()
    metrics = json.loads((run_dir / "02_prune" / "metrics.json").read_text())
    assert metrics["weight_bytes"] < metrics["file_bytes"], "weights, then the file around them"


def test_artifact_round_trip(smoke_run):
    path = smoke_run[0] / "01_train" / "model.pt"
    blob = read_model_file(path)  # weights_only=True inside
    assert blob["stage"] == "train" and blob["num_classes"] == 10
    m1, _ = load_model(path)
    m2, _ = load_model(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
    assert torch.load(path, weights_only=True)["state_dict"].keys() == m1.state_dict().keys()


def test_init_from_and_benchmark_only(tmp_path, smoke_run):
    art = smoke_run[0] / "01_train" / "model.pt"
    summary = pipeline.run(compose_cfg(["+experiment=smoke", "stages=[benchmark]",
                                        f"init_from={art}"]), tmp_path / "b")
    assert summary[0]["stage"] == "init:train" and summary[0]["latency_ms_p50_bs1"] > 0


def test_rerun_finished_run_does_not_train_again(tmp_path, smoke_run):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("0*/stage.json")}
    pipeline.run(compose_cfg(["+experiment=smoke"]), run_dir)
    assert len(stamps) == 5 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    changed = compose_cfg(["+experiment=smoke", "train.epochs=2", "stages=[train]"])
    with pytest.raises(EffrunError, match="different config"):
        pipeline.run(changed, run_dir)


def test_killed_training_resumes(tmp_path):
    """kill -9 in the middle of training; the rerun continues from the last finished epoch."""
    run_dir = tmp_path / "run"
    proc, ckpt = start_training(run_dir, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_epochs = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done_epochs < EPOCHS and not (run_dir / "01_train" / "stage.json").exists()
    res = run_cli(training_args(run_dir), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (run_dir / "effrun.log").read_text()
    assert f"resumed from {ckpt} after epoch {done_epochs}/{EPOCHS}" in log
    history = json.loads((run_dir / "01_train" / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))


def test_nan_loss_stops_with_clear_message_in_a_run_dir_under_cwd(tmp_path, monkeypatch):
    """Diverged training is a user error: one line, exit 1, no traceback, also in the run's log;
    the run dir is created under the current directory, wherever effrun is run from."""
    res = run_cli_here(["+experiment=smoke", "optimizer.lr=1e30", "optimizer.warmup_epochs=0",
                        "dataset.num_train=128", "stages=[train]"], tmp_path, monkeypatch)
    assert res.returncode == 1
    assert "loss became" in res.stderr and "Traceback" not in res.stderr
    (run_dir,) = (tmp_path / "outputs" / "smoke").iterdir()
    assert "loss became" in (run_dir / "effrun.log").read_text()
    assert "loss became" in (run_dir / "error.txt").read_text()
    assert not (REPO / "outputs" / "smoke" / run_dir.name).exists()


def test_validate_accepts_default_config():
    config = validate(compose_cfg())
    assert config.run.stages == ["train", "prune", "distill", "quantize", "benchmark"]
    assert config.run.name == "default"


EPOCHS = 6  # short epochs (ResNet-8, 256 images), enough to interrupt one after the first


def training_args(run_dir) -> list[str]:
    return ["+experiment=smoke", "model.depth=8", "dataset.num_train=256",
            "dataset.num_test=64", f"train.epochs={EPOCHS}", "stages=[train]",
            f"hydra.run.dir={run_dir}"]


def start_training(run_dir, tmp_path):
    """`effrun` training in a subprocess, returned once its first epoch is checkpointed."""
    proc = subprocess.Popen([sys.executable, "-m", "effrun", *training_args(run_dir)],
                            cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "01_train" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be interrupted"
    return proc, ckpt


def test_sigterm_stops_like_ctrl_c_and_keeps_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc, ckpt = start_training(run_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and f"hydra.run.dir={run_dir}" in stderr
    assert "Traceback" not in stderr
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1, "the checkpoint is kept"


def test_refused_runs_leave_the_records_as_they_were(tmp_path, smoke_run):
    """A run dir in use, an invalid value, or a finished stage made with another config: one
    line each, and config.json and the invocation history stay as they were."""
    from effrun import run_dir as run_dir_guard
    from effrun.errors import ConfigError

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run[0], run_dir)
    records = {name: (run_dir / name).read_bytes()
               for name in ("config.json", "invocations.jsonl")}
    with run_dir_guard.locked(run_dir):  # another effrun holds it
        with pytest.raises(EffrunError, match=rf"in use by another effrun \(pid {os.getpid()}\)"):
            pipeline.run(compose_cfg(["+experiment=smoke"]), run_dir)
    with pytest.raises(ConfigError):
        pipeline.run(compose_cfg(["+experiment=smoke", "train.epochs=-1"]), run_dir)
    changed = compose_cfg(["+experiment=smoke", "compression.prune.finetune_epochs=2"])
    with pytest.raises(EffrunError, match="02_prune holds a finished 'prune' stage"):
        pipeline.run(changed, run_dir)
    assert {name: (run_dir / name).read_bytes() for name in records} == records
    pipeline.run(compose_cfg(["+experiment=smoke"]), run_dir, ["+experiment=smoke"])
    history = (run_dir / "invocations.jsonl").read_text().splitlines()
    assert len(history) == 2 and '"+experiment=smoke"' in history[-1], "appended, not replaced"
