"""The tracking group: what TensorBoard and MLflow got, read back with their own readers, equals
the run's JSON records; tracking=none writes nothing; failures are one line or a warning."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import compose_cfg, options

from effrun import pipeline
from effrun.data import SyntheticData
from effrun.errors import EffrunError
from effrun.hardware import Hardware
from effrun.optim import SGD
from effrun.schema import SCHEMAS, TrainConfig, validate
from effrun.tracking import NoTracking, Tracker
from effrun.train import fit

EPOCHS = 2
# Seconds: a small ResNet on few small images (what is logged, not what is learnt, is tested).
SMALL = ["+experiment=smoke", f"train.epochs={EPOCHS}", "stages=[train,benchmark]",
         "dataset.num_train=256", "dataset.num_test=128", "dataset.image_size=16",
         "model.depth=8"]


def run(tmp_path: Path, tracking: str, *extra: str) -> tuple[Path, dict, list[dict]]:
    """(run dir, the train stage's metrics.json, summary) of a small train + benchmark run."""
    run_dir = tmp_path / "run"
    summary = pipeline.run(compose_cfg([*SMALL, f"tracking={tracking}", *extra]), run_dir)
    metrics = json.loads((run_dir / "01_train" / "metrics.json").read_text())
    return run_dir, metrics, summary


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """cwd = tmp_path (MLflow's default store is <cwd>/outputs/mlruns), no MLflow env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.parametrize("option", options("tracking"))
def test_tracking_option_validates(option):
    config = validate(compose_cfg([f"tracking={option}"]))
    assert type(config.tracking).__name__ in {t.rsplit(".", 1)[1] for t in SCHEMAS["tracking"]}


def test_default_is_no_tracking():
    assert isinstance(validate(compose_cfg([])).tracking, NoTracking)


def test_tensorboard_scalars_equal_the_records(in_tmp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics, summary = run(in_tmp, "tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    history = metrics["history"]
    for tag, key in (("train/loss", "train_loss"), ("train/lr", "lr"),
                     ("train/accuracy", "train_accuracy"), ("train/test_accuracy",
                                                            "test_accuracy")):
        points = events.Scalars(tag)
        assert [p.step for p in points] == list(range(1, EPOCHS + 1)), tag
        assert [p.value for p in points] == pytest.approx([h[key] for h in history]), tag
    for key in ("accuracy", "params", "flops", "weight_bytes", "file_bytes"):
        assert events.Scalars(f"stage/train/{key}")[0].value == pytest.approx(metrics[key])
    latency = events.Scalars("benchmark/train/latency_ms_p50_bs1")[0].value
    assert latency == pytest.approx(summary[0]["latency_ms_p50_bs1"])


def test_mlflow_params_metrics_artifacts(in_tmp):
    from mlflow.tracking import MlflowClient

    run_dir, metrics, _ = run(in_tmp, "mlflow", "stages=[train]")
    client = MlflowClient(f"sqlite:///{in_tmp / 'outputs' / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")  # the run's name
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run_dir.name and found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.epochs"] == str(EPOCHS) and params["dataset.num_train"] == "256"
    assert params["stages"] == '["train"]' and params["tracking._target_"].endswith("MLflow")
    loss = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2]
    assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx(
        [h["train_loss"] for h in metrics["history"]])
    assert found.data.metrics["stage/train/accuracy"] == pytest.approx(metrics["accuracy"])
    logged = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"summary.json", "config.json", "01_train"} <= logged
    stage_files = {a.path for a in client.list_artifacts(found.info.run_id, "01_train")}
    assert stage_files == {"01_train/metrics.json", "01_train/stage.json"}, "no model files"

    # Run again: the finished stage is not trained again, its epochs come from metrics.json.
    run(in_tmp, "mlflow", "stages=[train]")
    again = [r for r in client.search_runs([experiment.experiment_id])
             if r.info.run_id != found.info.run_id]
    replayed = client.get_metric_history(again[0].info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in replayed) == sorted((m.step, m.value) for m in loss)


def test_tracking_none_writes_nothing(in_tmp):
    run_dir, _, _ = run(in_tmp, "none", "stages=[train]", "train.epochs=1")
    assert not (run_dir / "tensorboard").exists()
    assert not (in_tmp / "outputs" / "mlruns").exists()


def test_unreachable_mlflow_server_is_one_line_before_any_stage(in_tmp):
    cfg = compose_cfg([*SMALL, "tracking=mlflow", "tracking.tracking_uri=http://127.0.0.1:9"])
    with pytest.raises(EffrunError, match="tracking=mlflow: cannot log to http") as e:
        pipeline.run(cfg, in_tmp / "run")
    assert "\n" not in str(e.value)
    assert not (in_tmp / "run" / "01_train").exists()


@pytest.mark.parametrize("option,modules", [("mlflow", ("mlflow", "mlflow.tracking")),
                                            ("tensorboard", ("torch.utils.tensorboard",))])
def test_missing_extra_names_it(in_tmp, monkeypatch, option, modules):
    for module in modules:  # importing them fails as if they were not installed
        monkeypatch.setitem(sys.modules, module, None)
    config = validate(compose_cfg([f"tracking={option}"]))
    with pytest.raises(EffrunError, match=r"effrun\[tracking\]"):
        config.tracking.start(in_tmp / "run", config)


def test_failing_tracker_warns_once_and_the_run_goes_on(caplog):
    class Broken(Tracker):
        def write(self, scalars, step):
            raise ConnectionError("server went away")

    tracker = Broken()
    tracker.log_epoch("train", {"epoch": 1, "train_loss": 1.0})
    tracker.log_stage("train", {"accuracy": 0.5})
    assert tracker.failed
    warnings = [r.getMessage() for r in caplog.records if "tracking stopped" in r.getMessage()]
    assert len(warnings) == 1 and "server went away" in warnings[0]


def test_progress_bar_shows_lr(tmp_path, monkeypatch):
    import effrun.train

    postfixes: list[dict] = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kwargs):
            postfixes.append(kwargs)

        def close(self):
            pass

    monkeypatch.setattr(effrun.train, "tqdm", Bar)
    seen: list[dict] = []
    result = fit(torch_net(), SyntheticData(num_train=64, num_test=16, image_size=8).load(seed=0),
                 hw=Hardware(device="cpu", precision="fp32", channels_last=False),
                 train=TrainConfig(epochs=2, batch_size=32, eval_every=0),
                 optimizer=SGD(lr=0.05, schedule="linear"), augment=None,
                 checkpoint=tmp_path / "c.pt", seed=0, on_epoch=seen.append)
    assert postfixes and all({"loss", "acc", "lr", "ips"} <= set(p) for p in postfixes)
    assert float(postfixes[-1]["lr"]) == pytest.approx(result["history"][-1]["lr"], rel=1e-2)
    assert seen == result["history"], "on_epoch sees each epoch's record"


def torch_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))
