"""effrun runs from any directory, installed as a wheel (configs inside the package) or editable,
and Hydra's multirun works."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from conftest import REPO, run_cli, run_cli_here


def test_wheel_install_finds_packaged_configs(tmp_path):
    target = tmp_path / "site"
    # The venv's own setuptools builds the wheel where it has one (3 s here against 9 s for an
    # isolated build env); the package data that ships is the same either way.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *isolation,
                          "--target", str(target), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (target / "effrun" / "configs" / "config.yaml").is_file()
    assert (target / "effrun" / "configs" / "experiment" / "smoke.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    # One process: where the installed package finds its configs, then `effrun --cfg job`.
    code = ("import sys; import effrun.cli as c; print(c.config_dir(), flush=True); "
            "sys.argv = ['effrun', '--cfg', 'job', '+experiment=smoke']; c.main()")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    where, _, shown = res.stdout.partition("\n")
    assert where == str(target / "effrun" / "configs"), res.stderr
    assert "name: smoke" in shown


def test_editable_install_runs_from_elsewhere(tmp_path):
    res = run_cli(["--cfg", "job", "model=resnet56"], cwd=tmp_path)
    assert res.returncode == 0 and "depth: 56" in res.stdout, res.stderr[-2000:]


def test_multirun_reports_a_failed_job_and_finishes_the_others(tmp_path, monkeypatch):
    """In a sweep, a job that fails (train.epochs=-1 is refused by validation) is reported in its
    job dir and in a line at the end; the other jobs run to completion; the exit code says."""
    res = run_cli_here(["-m", "+experiment=smoke", "stages=[train]", "dataset.num_train=256",
                        "dataset.num_test=64", "train.epochs=-1,1"], tmp_path, monkeypatch)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "1 job(s) failed" in res.stderr
    sweep = next((tmp_path / "outputs" / "smoke" / "multirun").iterdir())
    failed, done = sorted(sweep.glob("[01]_*"))  # job dirs: <num>_<overrides>
    assert failed.name.endswith("train.epochs=-1") and done.name.endswith("train.epochs=1")
    assert "train.epochs must be >= 0" in (failed / "error.txt").read_text()
    assert "train.epochs must be >= 0" in (failed / "effrun.log").read_text()
    assert (done / "summary.json").is_file() and not (done / "error.txt").exists()
