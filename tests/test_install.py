"""effrun runs from any directory, installed as a wheel (configs inside the package) or editable,
and Hydra's multirun works."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, run_cli


def test_wheel_install_finds_packaged_configs(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                          "--target", str(target), str(REPO)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (target / "effrun" / "configs" / "config.yaml").is_file()
    assert (target / "effrun" / "configs" / "experiment" / "smoke.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import effrun.cli as c; print(c.config_dir())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(target / "effrun" / "configs"), where.stderr
    res = subprocess.run([sys.executable, "-m", "effrun", "--cfg", "job", "+experiment=smoke"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "name: smoke" in res.stdout


def test_editable_install_runs_from_elsewhere(tmp_path):
    res = run_cli(["--cfg", "job", "model=resnet56"], cwd=tmp_path)
    assert res.returncode == 0 and "depth: 56" in res.stdout, res.stderr[-2000:]


def test_multirun_reports_a_failed_job_and_finishes_the_others(tmp_path):
    """In a sweep, a job that fails (train.epochs=-1 is refused by validation) is reported in its
    job dir and in a line at the end; the other jobs run to completion; the exit code says."""
    res = run_cli(["-m", "+experiment=smoke", "stages=[train]", "dataset.num_train=256",
                   "dataset.num_test=64", "train.epochs=-1,1"], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "1 job(s) failed" in res.stderr
    sweep = next((tmp_path / "outputs" / "smoke" / "multirun").iterdir())
    failed, done = sorted(sweep.glob("[01]_*"))  # job dirs: <num>_<overrides>
    assert failed.name.endswith("train.epochs=-1") and done.name.endswith("train.epochs=1")
    assert "train.epochs must be >= 0" in (failed / "error.txt").read_text()
    assert "train.epochs must be >= 0" in (failed / "effrun.log").read_text()
    assert (done / "summary.json").is_file() and not (done / "error.txt").exists()
