"""Sweeps that survive and search (issue 11): job dirs named by their overrides, the joblib and
submitit launchers (a failed job is listed whichever process ran it; joblib jobs split the
cores; a preempted submitit job is requeued and resumes its run dir) and the optuna sweeper's
presets, whose trials return the final model's top-1 and batch-1 latency."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg, run_cli_here
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from effrun import cli
from effrun.errors import ConfigError
from effrun.schema import config_dir, validate

TINY = ["+experiment=smoke", "dataset.num_train=128", "dataset.num_test=32", "train.epochs=1",
        "benchmark.batch_sizes=[1]"]


def effrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """`effrun ARGS` in a subprocess without the caller's thread settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR")}
    return subprocess.Popen([sys.executable, "-m", "effrun", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def hydra_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True).hydra


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()),
                  key=lambda p: int(p.name.split("_")[0]))


# ---------------------------------------------------------------- configs (no jobs run)

def test_launcher_and_sweeper_configs_compose():
    joblib = hydra_cfg(["hydra/launcher=joblib"]).launcher
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == -1
    local = hydra_cfg(["hydra/launcher=submitit_local"]).launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    plugin = hydra_cfg(["hydra/launcher=submitit_slurm"]).launcher
    ours = hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).launcher
    assert plugin._target_ == ours._target_ and ours._target_.endswith("SlurmLauncher")
    # effrun's slurm: the plugin's settings, but a timed-out job is requeued (it resumes)
    assert plugin.max_num_timeout == 0 and ours.max_num_timeout == 3 and ours.partition == "gpu"
    assert ours.submitit_folder.startswith("outputs/default/multirun/")  # in the sweep dir
    assert ours.submitit_folder.endswith("/.submitit/%j")

    pareto = hydra_cfg(["+experiment=search_prune"]).sweeper
    assert pareto._target_.endswith("OptunaSweeper") and list(pareto.direction) == [
        "maximize", "minimize"]
    assert pareto.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert "compression.prune.target_macs_ratio" in pareto.params
    budget = hydra_cfg(["+experiment=search_prune_budget"])
    assert budget.sweeper.direction == "maximize"
    assert budget.sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert compose_cfg(["+experiment=search_prune_budget"]).benchmark.latency_budget_ms > 0


def test_job_dir_names():
    assert cli.job_dir_name(0, "") == "0"  # no overrides: still a dir of its own
    assert cli.job_dir_name(3, "optimizer.lr=0.001,seed=1") == "3_optimizer.lr=0.001,seed=1"
    # a group override or a path does not nest dirs; quotes and spaces are not kept
    assert cli.job_dir_name(1, "compression/prune=l1,dataset.root='/a b'") == (
        "1_compression.prune=l1,dataset.root=_.a_b_")
    assert len(cli.job_dir_name(12, "x=" + "9" * 400)) == 203


def test_objectives_and_latency_budget():
    head = {"accuracy": 0.9, "latency_ms_p50_bs1": 3.0}
    assert cli.objective_values(head, ["maximize", "minimize"]) == [0.9, 3.0]
    assert cli.objective_values(head, ["maximize"]) == 0.9
    assert cli.objective_values(head, ["maximize"], budget=4.0) == 0.9
    assert cli.objective_values(head, ["maximize"], budget=2.0) == -1.5  # below any top-1
    with pytest.raises(ConfigError, match="benchmark.latency_budget_ms must be null or > 0"):
        validate(compose_cfg(["benchmark.latency_budget_ms=0"]))


# ---------------------------------------------------------------- sweeps that run

def test_joblib_jobs_split_the_cores_and_a_failed_job_is_listed(tmp_path):
    """Two jobs in joblib's worker processes: the one with a bad value fails (error.txt, one
    line at the end, exit 2), the other finishes; each ran with cores // 2 torch threads."""
    import joblib

    code, out, err = finish(effrun(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                    *TINY, "stages=[train,benchmark]", "train.epochs=-1,1"],
                                   cwd=tmp_path))
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "effrun: 1 job(s) failed:" in err, err[-3000:]
    sweep = next((tmp_path / "outputs" / "smoke" / "multirun").iterdir())
    failed, done = job_dirs(sweep)
    assert failed.name == ("0_benchmark.batch_sizes=[1],dataset.num_test=32,dataset.num_train=128,"
                           "stages=[train,benchmark],train.epochs=-1")
    assert done.name.startswith("1_") and done.name.endswith("train.epochs=1")
    listed = err.split("job(s) failed:")[1]
    assert failed.name in listed and "train.epochs must be >= 0" in listed
    assert done.name not in listed
    assert "train.epochs must be >= 0" in (failed / "error.txt").read_text()
    assert (done / "summary.json").is_file() and not (done / "error.txt").exists()
    threads = max(1, joblib.cpu_count() // 2)
    for job in (failed, done):
        assert f"joblib launcher: {threads} torch thread(s) per job" in (
            job / "effrun.log").read_text()
    assert json.loads((done / "config.json").read_text())["hardware"]["threads"] == threads
    bench = json.loads((done / "summary.json").read_text())["records"][-1]
    assert bench["threads"] == threads


def test_optuna_search_returns_the_summary_figures(tmp_path, monkeypatch):
    """search_smoke's NSGA-II, 2 trials: optimization_results.yaml's Pareto front holds the
    figures of the trials' own summary.json (top-1, batch-1 latency of the final model)."""
    done = run_cli_here(["-m", "+experiment=search_smoke", "hydra.sweeper.n_trials=2",
                         *TINY[1:], "stages=[train,benchmark]",
                         "optimizer.lr=interval(0.001,0.01)"], tmp_path, monkeypatch)
    code, err = done.returncode, done.stderr
    assert code == 0, err[-3000:]
    sweep = next((tmp_path / "outputs" / "search_smoke" / "multirun").iterdir())
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and results["solutions"], results
    trials = {}
    for job in job_dirs(sweep):
        config = json.loads((job / "config.json").read_text())
        head = json.loads((job / "summary.json").read_text())["headline"]
        assert head["stage"] == "train" and head["latency_ms_p50_bs1"] > 0
        trials[config["optimizer"]["lr"]] = [head["accuracy"], head["latency_ms_p50_bs1"]]
        assert f"objectives for the optuna sweeper ['maximize', 'minimize']: [{head['accuracy']}"\
            in (job / "effrun.log").read_text()
    assert len(trials) == 2
    for solution in results["solutions"]:
        assert trials[solution["params"]["optimizer.lr"]] == solution["values"], (solution, trials)


def test_submitit_local_runs_two_jobs_and_lists_the_failed_one(tmp_path):
    """submitit's local executor (the twin of submitit_slurm) really runs two jobs here, each in
    its own process: the bad one is listed at the end (read from its error.txt, since it failed
    in another process), the other finishes with a summary."""
    code, out, err = finish(effrun(["-m", "hydra/launcher=submitit_local", *TINY,
                                    "stages=[train]", "hardware.threads=1",
                                    "train.epochs=-1,1"], cwd=tmp_path))
    assert code == 2, err[-3000:]
    assert "effrun: 1 job(s) failed:" in err and "train.epochs must be >= 0" in err, err[-3000:]
    sweep = next((tmp_path / "outputs" / "smoke" / "multirun").iterdir())
    failed, done = job_dirs(sweep)
    assert (failed / "error.txt").is_file() and not (failed / "summary.json").exists()
    assert json.loads((done / "summary.json").read_text())["records"][-1]["stage"] == "train"
    assert any((sweep / ".submitit").rglob("*_result.pkl"))  # submitit ran them, not Hydra


@pytest.mark.slow
def test_submitit_local_runs_two_jobs_and_a_preempted_one_resumes(tmp_path):
    """Two jobs under submitit's local executor. Job 0 is preempted mid-training the way SLURM
    warns a job (SIGUSR2 to the job's process): submitit calls the launcher's checkpoint(),
    dumps the DelayedSubmission it returns and exits for requeue; submitit's local controller
    starts the job again, which resumes its run dir from the last per-epoch checkpoint."""
    # One thread each: the local executor starts both jobs at once.
    proc = effrun(["-m", "hydra/launcher=submitit_local", *TINY, "stages=[train]",
                   "train.epochs=6", "hardware.threads=1", "seed=0,1"], cwd=tmp_path)
    try:
        job0 = wait_for_checkpoint(tmp_path / "outputs" / "smoke" / "multirun", proc)
        pid = int((job0 / ".effrun.lock").read_text())  # the job's process holds the lock
        os.kill(pid, signal.SIGUSR2)
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-3000:]
    sweep = job0.parent
    jobs = job_dirs(sweep)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1"]
    assert jobs[0].name.endswith("seed=0,stages=[train],train.epochs=6")
    for job in jobs:
        record = json.loads((job / "summary.json").read_text())["records"][-1]
        assert record["stage"] == "train" and record["accuracy"] is not None
    log0 = (job0 / "effrun.log").read_text()
    resumed = [line for line in log0.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "/6" in resumed[0], log0[-3000:]
    assert "after epoch 6/6" not in resumed[0]  # it resumed mid-training
    assert "train epoch 6/6" in log0
    assert "resumed from" not in (jobs[1] / "effrun.log").read_text()
    submitit_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "this job is preempted" in submitit_logs  # submitit's own log of job 0
    assert "Calling checkpoint method" in log0 and "Requeued job" in log0


def wait_for_checkpoint(multirun: Path, proc: subprocess.Popen) -> Path:
    """Job 0's dir once its training has checkpointed an epoch."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        for ckpt in multirun.glob("*/0_*/01_train/checkpoint.pt"):
            if (ckpt.parent.parent / ".effrun.lock").read_text().strip():
                return ckpt.parent.parent
        time.sleep(0.05)
    raise AssertionError(f"no epoch checkpointed (exit {proc.poll()})")
