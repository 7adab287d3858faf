"""Shared test helpers: compose configs the way the CLI does, run the pipeline in-process."""

from __future__ import annotations

import copy
import fcntl
import functools
import json
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
    """effrun.schema.compose, remembered per overrides for the session (the packaged configs do
    not change while the tests run): Hydra composes in ~0.3 s on a 2-core EPYC, a copy of the
    result takes ~7 ms, and the suite composes the same few configs hundreds of times. Each
    caller gets its own copy to change."""
    return copy.deepcopy(_composed(tuple(overrides or ())))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose(list(overrides))


def write_image_tree(root: Path, *, classes: int = 2, per_class: int = 8,
                     test_per_class: int = 2, size: int = 64, seed: int = 0) -> Path:
    """A tiny ImageFolder tree of JPEGs, root/{train,test}/c<k>/<i>.jpg: class k is its own
    colour plus noise, so a small model tells them apart within an epoch. Returns root."""
    import torch
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(classes, 3, 1, 1, generator=gen) * 200
    for split, count in (("train", per_class), ("test", test_per_class)):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.rand(3, size, size, generator=gen) * 55
                image = (colours[k] + noise).to(torch.uint8)
                (root / split / f"c{k}" / f"{i}.jpg").write_bytes(
                    encode_jpeg(image, quality=90).numpy().tobytes())
    return root


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """`effrun ARGS` in a subprocess (python -m effrun, so the venv's interpreter is used)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "effrun", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_cli_here(args: list[str], cwd: Path, monkeypatch) -> subprocess.CompletedProcess:
    """`effrun ARGS` run by effrun.cli.main in this process, returned as run_cli returns it:
    for commands that end before any compute (a refused config, --help, --cfg), where a
    subprocess would spend ~6 s (2-core EPYC) importing torch and effrun again to run the same
    code. Hydra's logging set-up, the signal handlers, Hydra's global state and torch's thread
    count are put back afterwards; commands that train stay in run_cli's subprocesses."""
    import contextlib
    import io
    import logging
    import logging.config
    import signal

    import torch
    from hydra.core.global_hydra import GlobalHydra

    from effrun import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["effrun", *args])
    # Hydra's logging set-up (dictConfig) would close every handler of the process, pytest's
    # own among them; its handlers replace the root's only until they are put back below.
    monkeypatch.setattr(logging.config, "_clearExistingHandlers", lambda: None)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads, code = torch.get_num_threads(), 0
    out, err = io.StringIO(), io.StringIO()
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        GlobalHydra.instance().clear()
        for lg, level, handlers, propagate, disabled in saved:
            for handler in set(lg.handlers) - set(handlers):
                handler.close()
            lg.handlers[:], lg.level, lg.propagate, lg.disabled = (handlers, level, propagate,
                                                                   disabled)
        for signum, handler in signals.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["effrun", *args], code, out.getvalue(), err.getvalue())


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
    Tests must not change it; copy it first. Under pytest-xdist the workers share one: the
    first computes it while the others wait on a lock, then read its summary.json."""
    from effrun import pipeline

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's temp root, shared by its workers
    run_dir = root / "smoke-shared" / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / "compute.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = run_dir / "summary.json"
        if summary.is_file():
            return run_dir, json.loads(summary.read_text())["records"]
        return run_dir, pipeline.run(compose_cfg(["+experiment=smoke"]), run_dir)


@pytest.fixture(scope="session", autouse=True)
def _stage_cache_of_shared_runs(tmp_path_factory):
    """The stage cache (cache.dir) of the session and module fixtures' runs: a temp dir, not
    the repo's outputs/cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EFFRUN_STAGE_CACHE_DIR", str(tmp_path_factory.mktemp("stage-cache")))
        yield


@pytest.fixture(autouse=True)
def _stage_cache(tmp_path_factory, monkeypatch):
    # Each test gets an empty stage cache: it computes what it runs, unless it reuses on purpose.
    monkeypatch.setenv("EFFRUN_STAGE_CACHE_DIR", str(tmp_path_factory.mktemp("stage-cache")))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    # Decoded-data caches of the tests stay out of the user's cache unless CI points elsewhere.
    if "EFFRUN_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("EFFRUN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_configure(config):
    """Under pytest-xdist (pyproject's addopts: two workers), each worker computes with one
    thread, so that two workers share the two cores instead of four threads fighting over them;
    subprocesses a test starts inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch  # conftest's imports may have loaded it before the variable was set

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
