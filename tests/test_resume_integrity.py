"""Resuming trusts nothing it cannot check: stage.json's sha256 of each artifact, torn records,
checkpoints holding NaN/inf, and torn checkpoints (fallback to <name>.prev.pt, else a restart)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import compose_cfg
from test_train_loop import STEPS_PER_EPOCH, assert_same_weights, run_args, stop_at, tiny_net

from effrun import pipeline
from effrun.artifacts import sha256_file
from effrun.checkpoint import nonfinite_tensors, prev_checkpoint
from effrun.errors import EffrunError
from effrun.measure import set_threads
from effrun.optim import SGD
from effrun.train import TrainingDiverged, fit

TINY = ["+experiment=smoke", "stages=[train,benchmark]", "dataset.num_train=256",
        "dataset.num_test=64", "train.epochs=1", "benchmark.batch_sizes=[1]"]


@pytest.fixture(autouse=True)
def one_thread():
    with set_threads(1):  # bit-identical resume needs the same reduction order in both runs
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run (train + benchmark); tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    pipeline.run(compose_cfg(TINY), run_dir)
    return run_dir


@pytest.fixture
def run_dir(tmp_path, finished_run):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def rerun(run_dir, caplog) -> list[str]:
    """Run the same config in `run_dir` again; returns the warning lines it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="effrun"):
        pipeline.run(compose_cfg(TINY), run_dir)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def assert_finished_and_intact(run_dir) -> None:
    train = run_dir / "01_train"
    info = json.loads((train / "stage.json").read_text())
    assert info["sha256"] == {"model.pt": sha256_file(train / "model.pt")}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all((run_dir / "01_train" / "model.pt").samefile(r["artifact"])
               for r in summary["records"])


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_stage_json_records_the_artifacts_sha256(finished_run):
    assert_finished_and_intact(finished_run)
    bench = json.loads((finished_run / "05_benchmark" / "stage.json").read_text())
    assert bench["sha256"] == {
        "metrics.json": sha256_file(finished_run / "05_benchmark" / "metrics.json")}


def test_deleted_artifact_is_recomputed(run_dir, caplog):
    path = run_dir / "01_train" / "model.pt"
    original = torch.load(path, weights_only=True)
    path.unlink()
    warnings = rerun(run_dir, caplog)
    assert warnings[0] == "01_train/model.pt is missing: running the stage again"
    # torch.save names the archive after the temp file, so the same weights are other bytes.
    assert warnings[1:] in ([], ["01_train/model.pt is not the file 05_benchmark measured: "
                                 "running the stage again"])
    assert "train: resumed from" in caplog.text, "rebuilt from the final checkpoint, no training"
    assert_same_state(torch.load(path, weights_only=True), original)
    assert_finished_and_intact(run_dir)


def test_changed_artifact_is_recomputed(run_dir, caplog):
    path = run_dir / "01_train" / "model.pt"
    original = torch.load(path, weights_only=True)
    blob = torch.load(path, weights_only=True)
    next(iter(blob["state_dict"].values())).add_(1.0)
    torch.save(blob, path)
    (warning, *_) = rerun(run_dir, caplog)
    assert warning.startswith("01_train/model.pt changed since it was written (sha256 ")
    assert warning.endswith(": running the stage again") and "\n" not in warning
    assert_same_state(torch.load(path, weights_only=True), original)
    assert_finished_and_intact(run_dir)


def test_benchmark_measures_again_when_a_model_is_not_the_one_it_measured(run_dir, caplog):
    """A stage that ran again and wrote different bytes (say, on a nondeterministic GPU)."""
    path = run_dir / "01_train" / "model.pt"
    blob = torch.load(path, weights_only=True)
    next(iter(blob["state_dict"].values())).add_(1.0)
    torch.save(blob, path)
    info_path = run_dir / "01_train" / "stage.json"
    info = json.loads(info_path.read_text())
    info["sha256"]["model.pt"] = sha256_file(path)
    info_path.write_text(json.dumps(info))
    assert rerun(run_dir, caplog) == [
        "01_train/model.pt is not the file 05_benchmark measured: running the stage again"]
    assert "train: already finished" in caplog.text
    bench = json.loads((run_dir / "05_benchmark" / "stage.json").read_text())
    assert bench["measured_sha256"] == {"train": sha256_file(path)}


@pytest.mark.parametrize("name", ["01_train/stage.json", "01_train/metrics.json",
                                  "05_benchmark/metrics.json"])
def test_truncated_record_is_one_warning_and_recomputed(run_dir, caplog, name):
    path = run_dir / name
    path.write_text(path.read_text()[:40])
    (warning, *_) = rerun(run_dir, caplog)
    assert warning.startswith(name) and warning.endswith(": running the stage again")
    json.loads(path.read_text())  # whole again
    assert_finished_and_intact(run_dir)


def test_stage_json_without_sha256_is_accepted(run_dir, caplog):
    """stage.json files written before the digests existed still mark a finished stage."""
    for stage in ("01_train", "05_benchmark"):
        path = run_dir / stage / "stage.json"
        info = json.loads(path.read_text())
        del info["sha256"]
        path.write_text(json.dumps(info))
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("0*/stage.json")}
    assert rerun(run_dir, caplog) == []
    assert "train: already finished" in caplog.text
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_other_config_is_still_refused(run_dir):
    with pytest.raises(EffrunError, match="different config"):
        pipeline.run(compose_cfg([*TINY, "train.epochs=2"]), run_dir)


def test_blown_up_batchnorm_statistics_stop_training_before_a_checkpoint(tmp_path):
    """lr=1e5: the loss stays finite but BN's running_var overflows in epoch 2."""
    args = run_args(tmp_path, epochs=2)
    args["optimizer"] = SGD(lr=1e5, schedule="linear")
    with pytest.raises(TrainingDiverged, match=r"NaN/inf in \d+ of \d+ weight") as info:
        fit(tiny_net(), **args)
    msg = str(info.value)
    assert "(first: 1.running_var)" in msg and "\n" not in msg, msg
    assert f"last good checkpoint kept at {args['checkpoint']}" in msg
    ckpt = torch.load(args["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == 1 and nonfinite_tensors(ckpt["model"]) == []


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    straight = tiny_net()
    fit(straight, **run_args(tmp_path, name="a.pt"))
    assert torch.load(tmp_path / "a.prev.pt", weights_only=True)["epoch"] == 2

    args = run_args(tmp_path, name="b.pt")
    with pytest.raises(KeyboardInterrupt):  # in epoch 3: b.pt after epoch 2, b.prev.pt after 1
        fit(tiny_net(), **args, after_step=stop_at(2 * STEPS_PER_EPOCH + 2))
    ckpt = args["checkpoint"]
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    resumed = tiny_net()
    with caplog.at_level(logging.INFO, logger="effrun"):
        fit(resumed, **args)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"train: {ckpt} cannot be loaded (truncated or damaged")
    assert warning.endswith("resumed from the previous checkpoint b.prev.pt after epoch 1/3")
    assert_same_weights(straight, resumed)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3


def test_truncated_checkpoint_without_a_previous_one_restarts(tmp_path, caplog):
    straight = tiny_net()
    fit(straight, **run_args(tmp_path, name="a.pt"))

    args = run_args(tmp_path, name="b.pt")
    with pytest.raises(KeyboardInterrupt):  # in epoch 2: only b.pt, after epoch 1
        fit(tiny_net(), **args, after_step=stop_at(STEPS_PER_EPOCH + 2))
    ckpt = args["checkpoint"]
    assert not prev_checkpoint(ckpt).exists()
    ckpt.write_bytes(b"")
    resumed = tiny_net()
    with caplog.at_level(logging.INFO, logger="effrun"):
        fit(resumed, **args)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"train: {ckpt} cannot be loaded")
    assert warning.endswith("training this stage again from the start")
    assert "resumed from" not in caplog.text
    assert_same_weights(straight, resumed)


def test_observer_sentinels_are_not_divergence():
    """QAT observers start at min_val=+inf, max_val=-inf; only real NaN/inf counts."""
    inf = float("inf")
    named = {"obs.min_val": torch.tensor(inf), "obs.max_val": torch.tensor(-inf),
             "bad.min_val": torch.tensor(-inf), "1.running_var": torch.tensor([1.0, inf]),
             "1.num_batches_tracked": torch.tensor(3), "0.weight": torch.tensor([float("nan")])}
    assert nonfinite_tensors(named) == ["bad.min_val", "1.running_var", "0.weight"]
