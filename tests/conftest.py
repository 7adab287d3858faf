"""Shared test helpers: compose configs the way the CLI does, run the pipeline in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from effrun.schema import compose, config_dir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path(config_dir())


def options(group: str) -> list[str]:
    """Every option of a config group, found by globbing its YAML files."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_cfg(overrides: list[str] | None = None):
    return compose(overrides)


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """`effrun ARGS` in a subprocess (python -m effrun, so the venv's interpreter is used)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "effrun", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def stage_ctx(tmp_path: Path, stage: str, overrides: list[str]):
    """(StageInputs as the pipeline builds them, the stage's method, a fresh model) for calling
    a compression method directly, from a composed config."""
    from effrun.schema import validate
    from effrun.stage import stage_inputs

    config = validate(compose_cfg(overrides))
    config.hardware.setup(config.run.seed)
    data = config.dataset.load(seed=config.run.seed)
    inputs = stage_inputs(config, stage, tmp_path, data, fingerprint="test")
    return inputs, config.compression.get(stage), config.model.build(num_classes=data.num_classes)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One run of the smoke study, every stage (train → channel prune → KD → int8 PTQ →
    benchmark), shared by the tests that read a finished run: (run dir, summary records).
    Tests must not change it; copy it first."""
    from effrun import pipeline

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    return run_dir, pipeline.run(compose_cfg(["+experiment=smoke"]), run_dir)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    # Decoded-data caches of the tests stay out of the user's cache unless CI points elsewhere.
    if "EFFRUN_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("EFFRUN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
