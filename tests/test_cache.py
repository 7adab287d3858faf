"""The stage cache (effrun/cache.py): a finished stage is reused across runs by its fingerprint,
checked against its manifest before use, computed once by parallel jobs; effrun-cache lists and
prunes it. Tiny runs: train (1 epoch, 64 images) and magnitude pruning without fine-tuning."""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import shutil
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_cli_here

from effrun import cache, cache_cli, keys, pipeline
from effrun.artifacts import sha256_file
from effrun.measure import set_threads
from effrun.schema import validate

TINY = ["+experiment=smoke", "stages=[train,prune]", "compression/prune=magnitude",
        "compression.prune.finetune_epochs=0", "dataset.num_train=64", "dataset.num_test=32",
        "train.batch_size=32", "train.epochs=1", "model.width=8"]


@pytest.fixture(autouse=True)
def one_thread():
    with set_threads(1):  # a recomputed stage must give the very same weights
        yield


def run(run_dir: Path, cache_dir: Path, *extra: str, caplog=None) -> list[str]:
    """One tiny run against `cache_dir`; returns its warning lines (with caplog)."""
    cfg = compose_cfg([*TINY, f"cache.dir={cache_dir}", *extra])
    if caplog is None:
        pipeline.run(cfg, run_dir)
        return []
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="effrun"):
        pipeline.run(cfg, run_dir)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def info(run_dir: Path, stage: str) -> dict:
    return json.loads((pipeline.stage_dir_for(run_dir, stage) / "stage.json").read_text())


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((pipeline.stage_dir_for(run_dir, stage) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, Path]:
    """A run that computed train and prune and stored both: (run dir, cache dir)."""
    base = tmp_path_factory.mktemp("first")
    with set_threads(1):
        run(base / "run", base / "cache")
    return base / "run", base / "cache"


@pytest.fixture
def cache_copy(tmp_path, first) -> Path:
    """The first run's cache, for a test to change."""
    shutil.copytree(first[1], tmp_path / "cache")
    return tmp_path / "cache"


def test_a_miss_computes_and_stores_the_stage(first):
    run_dir, cache_dir = first
    for stage in ("train", "prune"):
        record = info(run_dir, stage)
        entry = cache_dir / f"{stage}-{record['fingerprint']}"
        assert record["cache"] == {"hit": False, "stored": str(entry)}
        manifest = json.loads((entry / "manifest.json").read_text())
        assert manifest["created_by"] == str(run_dir.resolve())
        assert manifest["files"] == {name: sha256_file(entry / name)
                                     for name in ("model.pt", "metrics.json", "stage.json")}
        assert sha256_file(entry / "model.pt") == record["sha256"]["model.pt"]
    assert (run_dir / "01_train" / "checkpoint.pt").is_file(), "checkpoints stay in the run dir"
    assert not list(cache_dir.glob("train-*/checkpoint*")), "and only there"


def test_a_second_run_reuses_every_stage(tmp_path, first, cache_copy, caplog):
    assert run(tmp_path / "run", cache_copy, caplog=caplog) == []
    for stage in ("train", "prune"):
        key = info(first[0], stage)["fingerprint"]
        entry = cache_copy / f"{stage}-{key}"
        assert info(tmp_path / "run", stage)["cache"] == {"hit": True, "entry": str(entry),
                                                          "key": key}
        assert f"{stage}: reused from cache entry {key} ({entry})" in caplog.text
        assert metrics(tmp_path / "run", stage) == metrics(first[0], stage)
        users = (entry / "users.jsonl").read_text().splitlines()
        assert [json.loads(u)["run_dir"] for u in users] == [str(first[0].resolve()),
                                                            str((tmp_path / "run").resolve())]
    assert "train epoch" not in caplog.text, "nothing trained"
    assert not (tmp_path / "run" / "01_train" / "checkpoint.pt").exists()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r["accuracy"] for r in summary["records"]] == [
        metrics(first[0], s)["accuracy"] for s in ("train", "prune")]


def test_a_changed_compression_setting_reuses_train_and_recomputes_prune(tmp_path, first,
                                                                         cache_copy):
    run(tmp_path / "run", cache_copy, "compression.prune.sparsity=0.3")
    assert info(tmp_path / "run", "train")["cache"]["hit"] is True
    pruned = info(tmp_path / "run", "prune")
    assert pruned["cache"]["hit"] is False
    assert pruned["fingerprint"] != info(first[0], "prune")["fingerprint"]
    assert len(list(cache_copy.glob("prune-*/manifest.json"))) == 2


@pytest.mark.parametrize("damage", ["truncated model.pt", "altered metrics.json",
                                    "torn manifest.json"])
def test_a_damaged_entry_is_one_warning_removed_and_recomputed(tmp_path, first, cache_copy,
                                                               caplog, damage):
    entry = cache_copy / f"train-{info(first[0], 'train')['fingerprint']}"
    name = damage.split()[1]
    path = entry / name
    if damage.startswith("altered"):
        path.write_text(path.read_text().replace('"accuracy": ', '"accuracy": 1'))
    else:
        path.write_bytes(path.read_bytes()[:100])
    warnings = run(tmp_path / "run", cache_copy, caplog=caplog)
    why = {"truncated model.pt": "model.pt does not match its sha256",
           "altered metrics.json": "metrics.json does not match its sha256",
           "torn manifest.json": "manifest.json is missing or not valid"}[damage]
    assert warnings == [f"stage cache entry {entry} is damaged ({why}): removed, computing "
                        f"train again"]
    assert info(tmp_path / "run", "train")["cache"] == {"hit": False, "stored": str(entry)}
    assert metrics(tmp_path / "run", "train")["accuracy"] == metrics(first[0], "train")[
        "accuracy"]
    ours, theirs = (torch.load(r / "01_train" / "model.pt", weights_only=True)["state_dict"]
                    for r in (tmp_path / "run", first[0]))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert info(tmp_path / "run", "prune")["cache"]["hit"] is True, "the same train: prune hits"
    manifest = json.loads((entry / "manifest.json").read_text())  # stored again, whole
    assert manifest["files"]["model.pt"] == sha256_file(entry / "model.pt")


def test_cache_disabled_stores_and_reads_nothing(tmp_path, cache_copy, caplog):
    before = {p: p.stat().st_mtime_ns for p in cache_copy.rglob("*")}
    run(tmp_path / "run", cache_copy, "cache.enabled=false", "stages=[train]", caplog=caplog)
    assert "cache" not in info(tmp_path / "run", "train")
    assert "train epoch 1/1" in caplog.text, "trained, not reused"
    assert {p: p.stat().st_mtime_ns for p in cache_copy.rglob("*")} == before


def job(run_dir: Path, overrides: list[str], log_path: Path) -> None:
    """One effrun job in a forked process (no second import of torch), logging to a file."""
    handler = logging.FileHandler(log_path)
    logging.getLogger("effrun").addHandler(handler)
    logging.getLogger("effrun").setLevel(logging.INFO)
    pipeline.run(compose_cfg(overrides), run_dir)
    handler.flush()


def test_parallel_jobs_compute_a_stage_once(tmp_path):
    """Both jobs find the entry's lock held (here by the test, as by a job computing it), wait,
    then one computes and stores and the other reuses."""
    overrides = [*TINY, "stages=[train]", f"cache.dir={tmp_path / 'cache'}"]
    key = keys.fingerprint({"stage": keys.stage_config(validate(compose_cfg(overrides)),
                                                                 "train"), "parent": None})
    (tmp_path / "cache").mkdir()
    lock = cache.entry_path(tmp_path / "cache", "train", key).with_suffix(".lock")
    fork = multiprocessing.get_context("fork")
    jobs = {n: fork.Process(target=job, args=(tmp_path / n, overrides, tmp_path / f"{n}.log"))
            for n in "ab"}
    waiting = f"train: waiting for another job computing train ({key})"
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for proc in jobs.values():
            proc.start()
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"{n}.log").is_file()
                      and waiting in (tmp_path / f"{n}.log").read_text() for n in jobs):
            assert time.monotonic() < deadline, "the jobs did not reach the lock"
            assert all(p.is_alive() for p in jobs.values()), "a job did not wait"
            time.sleep(0.05)
        fcntl.flock(held, fcntl.LOCK_UN)  # not just close: the children share this descriptor
    for name, proc in jobs.items():
        proc.join(timeout=60)
        assert proc.exitcode == 0, (tmp_path / f"{name}.log").read_text()
    hits = sorted(info(tmp_path / n, "train")["cache"]["hit"] for n in jobs)
    assert hits == [False, True], "computed once, reused once"
    assert sum((tmp_path / n / "01_train" / "checkpoint.pt").exists() for n in jobs) == 1
    assert len((lock.with_suffix("") / "users.jsonl").read_text().splitlines()) == 2


def test_list_and_prune(tmp_path, first, cache_copy, capsys):
    run(tmp_path / "run", cache_copy, "compression.prune.sparsity=0.3")  # reuses train only
    train_key = info(first[0], "train")["fingerprint"]
    cache_cli.main(["list", "--dir", str(cache_copy)])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if train_key in line)
    assert "train" in row and "KiB" in row and str(first[0].resolve()) in row
    assert str((tmp_path / "run").resolve()) in row, "the run that reused it"
    assert "3 entries" in out

    cache_cli.main(["prune", "--dir", str(cache_copy), "--unused", "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("would remove prune-") == 2 and "train-" not in out
    assert len(cache.read_entries(cache_copy)) == 3, "a dry run removes nothing"
    cache_cli.main(["prune", "--dir", str(cache_copy), "--older-than", "1"])
    assert "removed 0 of 3 entries" in capsys.readouterr().out
    cache_cli.main(["prune", "--dir", str(cache_copy), "--stage", "prune"])
    assert "removed 2 of 3 entries" in capsys.readouterr().out
    assert [e["stage"] for e in cache.read_entries(cache_copy)] == ["train"]
    assert not list(cache_copy.glob("prune-*"))

    cache_cli.main(["prune", "--all", "--dir", str(cache_copy)])
    assert "removed 1 of 1 entries" in capsys.readouterr().out
    assert not any(cache_copy.iterdir()), "entries and their lock files"
    with pytest.raises(SystemExit) as exit_info:
        cache_cli.main(["prune", "--dir", str(cache_copy)])
    assert exit_info.value.code == 2
    assert "--older-than DAYS, --unused, --stage S or --all" in capsys.readouterr().err
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts["effrun-cache"] == "effrun.cache_cli:main"


def test_the_key_ignores_where_files_live_and_counts_init_from_by_content(tmp_path, first):
    base = ["dataset=cifar10", "dataset.root=/data/cifar10"]
    a, b = (keys.stage_config(validate(compose_cfg([*base, *o])), "train")
            for o in (["dataset.cache_dir=/a"], ["dataset.cache_dir=/b", "dataset.download=true"]))
    assert a == b
    assert a["precision"] in ("fp32", "bf16", "fp16") and a["device"] == "cpu"
    model = first[0] / "01_train" / "model.pt"
    copy = tmp_path / "elsewhere" / "weights.pt"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    fps = [keys.init_fingerprint(validate(compose_cfg([f"init_from={p}"])))
           for p in (model, copy)]
    assert fps[0] == fps[1]
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert keys.init_fingerprint(validate(compose_cfg([f"init_from={copy}"]))) != fps[0]


def test_a_relative_cache_dir_is_relative_to_the_launch_directory(tmp_path, monkeypatch):
    """Also when the Hydra job changes into its run dir (hydra.job.chdir=true)."""
    res = run_cli_here([*TINY, "stages=[train]", "hydra.job.chdir=true",
                        f"hydra.run.dir={tmp_path / 'run'}", "cache.dir=rel/cache"], tmp_path,
                       monkeypatch)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "rel" / "cache").glob("train-*/manifest.json"))) == 1
    assert not (tmp_path / "run" / "rel").exists()


def test_benchmark_compares_against_this_runs_own_parent(tmp_path):
    """A stage reused from the cache names its parent's artifact in the run that computed it;
    the benchmark times this run's file of that stage instead (same stage dir and name)."""
    from effrun.benchmark import own_reference
    from effrun.stage import Deployment, ModelRecord

    other = "/elsewhere/run/03_distill/model.pt"
    mine = [ModelRecord("train", tmp_path / "01_train" / "model.pt", {}, 10, "a"),
            ModelRecord("distill", tmp_path / "03_distill" / "model.pt", {}, 10, "b")]
    deploy = Deployment(precision="int8", compare_to=other)
    assert own_reference(deploy, mine).compare_to == str(tmp_path / "03_distill" / "model.pt")
    assert own_reference(deploy, mine[:1]).compare_to == other  # not in this run: as stored
    assert own_reference(Deployment(), mine).compare_to is None
