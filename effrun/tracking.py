"""Experiment tracking: the `tracking` config group (none | tensorboard | mlflow).

The JSON files in the run dir stay the source of truth; a tracker mirrors them for browsing.
`run_stages` opens the chosen option for the run (`with config.tracking.start(run_dir, config)
as tracker`); a problem opening it (the extra not installed, a server unreachable) is one
EffrunError line before any compute. While the run goes on, a logging failure is one warning
and the tracker goes quiet: tracking never stops a run, and it never changes its results (it
only reads the records the run produced).

What is logged, as scalars (TensorBoard tags = MLflow metric keys; ":" in a name becomes "/"):
    <fit>/<key>               per epoch of every `fit` (step = its epoch, 1-based): fit is the
                              stage, or stage/name for a named fit ("distill/student",
                              "quantize/qat"); key: loss, accuracy, lr, img_per_s, and
                              val_loss / val_accuracy (or test_*) on evaluated epochs; a
                              stage found finished or cached: from its metrics.json history
    stage/<stage>/<key>       every number in the stage's metrics.json (accuracy, params, flops,
                              weight_bytes, file_bytes, ...), after the stage (step 0)
    benchmark/<stage>/<key>   every number of the model's summary row when the benchmark ran
                              (latency_ms_p50_bs1, latency_ms_p50_bs_max, throughput_ips, ...)
MLflow also gets the flattened resolved config as params (dot keys) and, at the end, the run's
summary.json, config.json and each stage's metrics.json / stage.json (`log_models` adds the
model files).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from effrun.errors import EffrunError

log = logging.getLogger("effrun")
INSTALL_HINT = "pip install 'effrun[tracking]'"
# History record key -> the name it is logged under.
EPOCH_KEYS = {"train_loss": "loss", "train_accuracy": "accuracy", "lr": "lr",
              "images_per_s": "img_per_s", "val_loss": "val_loss",
              "val_accuracy": "val_accuracy", "test_loss": "test_loss",
              "test_accuracy": "test_accuracy"}


def tag(*parts: str) -> str:
    return "/".join(parts).replace(":", "/")


def numbers(record: dict) -> dict[str, float]:
    """The plain numbers of a record (bools, None, lists and strings left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """An open tracking session. This base logs nothing (tracking=none); the backends override
    `write` and `finish`. A failing backend is reported once and then left alone."""

    def __init__(self) -> None:
        self.failed = False
        self.trained: set[str] = set()  # stages whose epochs were logged as they ran

    def write(self, scalars: dict[str, float], step: int) -> None:
        pass

    def finish(self, run_dir: Path, ok: bool) -> None:
        pass

    def log(self, scalars: dict[str, float], step: int) -> None:
        if scalars:
            self._guard("log", self.write, scalars, step)

    def log_epoch(self, fit_name: str, record: dict) -> None:
        """One epoch's history record of the `fit` named `fit_name` (its desc)."""
        self.trained.add(fit_name.split(":")[0])
        values = numbers(record)
        self.log({tag(fit_name, name): values[key] for key, name in EPOCH_KEYS.items()
                  if key in values}, step=int(record["epoch"]))

    def log_stage(self, stage: str, metrics: dict) -> None:
        """A model stage's metrics.json figures, once it finished. A stage that did not train
        here (finished before, or taken from the stage cache) gets its epochs from its
        metrics.json history, so every run shows its curves."""
        if stage not in self.trained:
            for record in metrics.get("history") or []:
                self.log_epoch(stage, record)
        self.log({tag("stage", stage, k): v for k, v in numbers(metrics).items()}, step=0)

    def log_benchmark(self, summary: list[dict]) -> None:
        """The summary rows (one per model and runtime) of a run whose benchmark ran; a row of
        another runtime than torch logs as benchmark/<stage>@<backend>/<key>."""
        for row in summary:
            name = row["stage"] if row.get("backend", "torch") == "torch" else (
                f"{row['stage']}@{row['backend']}")
            self.log({tag("benchmark", name, k): v for k, v in numbers(row).items()}, step=0)

    def close(self, run_dir: Path, ok: bool) -> None:
        self._guard("close", self.finish, run_dir, ok)

    def _guard(self, what: str, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # the JSON records are the truth: tracking never stops a run
            self.failed = True
            log.warning("tracking stopped (%s failed: %s); the run goes on, its records are "
                        "in the run dir", what, first_line(e))


@contextlib.contextmanager
def session(tracker: Tracker, run_dir: Path) -> Iterator[Tracker]:
    """Yield `tracker`; close it when the run ends (ok or not), also after an exception."""
    ok = False
    try:
        yield tracker
        ok = True
    finally:
        tracker.close(run_dir, ok)


@dataclass
class NoTracking:
    """tracking=none: the JSON records in the run dir only."""

    def start(self, run_dir: Path, config: Any) -> contextlib.AbstractContextManager[Tracker]:
        return session(Tracker(), Path(run_dir))


@dataclass
class TensorBoard:
    """tracking=tensorboard: event files for `tensorboard --logdir outputs`."""

    log_dir: Optional[str] = None  # null = <run_dir>/tensorboard; a path: the events go there

    def start(self, run_dir: Path, config: Any) -> contextlib.AbstractContextManager[Tracker]:
        run_dir = Path(run_dir)
        where = Path(self.log_dir) if self.log_dir else run_dir / "tensorboard"
        return session(TensorBoardTracker(where), run_dir)


@dataclass
class MLflow:
    """tracking=mlflow: params, metrics and the run's JSON records in an MLflow run."""

    # null = $MLFLOW_TRACKING_URI when set, else a local store outside the run dirs:
    # sqlite:///<cwd>/outputs/mlruns/mlflow.db (MLflow's file store is in maintenance mode).
    tracking_uri: Optional[str] = None
    experiment: Optional[str] = None  # null = the run's `name`
    log_models: bool = False  # also upload each stage's model file (they can be large)

    def start(self, run_dir: Path, config: Any) -> contextlib.AbstractContextManager[Tracker]:
        run_dir = Path(run_dir)
        tracker = MLflowTracker.open(self.tracking_uri, self.experiment or config.run.name,
                                     run_name=run_dir.name, config=config.raw,
                                     run_dir=run_dir, log_models=self.log_models)
        return session(tracker, run_dir)


def missing_extra(option: str, library: str) -> EffrunError:
    return EffrunError(f"tracking={option} needs {library}, which is not installed: "
                       f"{INSTALL_HINT}")


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path):
        super().__init__()
        try:  # torch's writer; it needs the tensorboard package
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_extra("tensorboard", "tensorboard") from None
        try:
            self.writer = SummaryWriter(log_dir=str(log_dir))
        except OSError as e:
            raise EffrunError(f"tracking.log_dir={log_dir}: {first_line(e)}") from None

    def write(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # visible in a running TensorBoard after each epoch

    def finish(self, run_dir: Path, ok: bool) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, client: Any, run_id: str, log_models: bool):
        super().__init__()
        self.client, self.run_id, self.log_models = client, run_id, log_models

    @classmethod
    def open(cls, uri: str | None, experiment: str, *, run_name: str, config: Any,
             run_dir: Path, log_models: bool) -> MLflowTracker:
        """Create the MLflow run (and its experiment, if new) and log the params; any failure
        is one EffrunError line, before the run computes anything."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_extra("mlflow", "mlflow") from None
        uri, artifact_location = resolve_uri(uri)
        try:
            with fail_fast():
                client = MlflowClient(tracking_uri=uri)
                found = client.get_experiment_by_name(experiment)
                exp_id = (found.experiment_id if found else client.create_experiment(
                    experiment, artifact_location=artifact_location))
                run = client.create_run(exp_id, run_name=run_name,
                                        tags={"effrun.run_dir": str(run_dir)})
                tracker = cls(client, run.info.run_id, log_models)
                tracker.log_params(flat_params(config))
        except Exception as e:  # mlflow raises many kinds; the user needs one line
            refused = re.search(r"\[Errno -?\d+\] ([^\"')]+)", str(e))
            why = f"no server answers ({refused.group(1)})" if refused else first_line(e)[:300]
            raise EffrunError(f"tracking=mlflow: cannot log to {uri}: {why}") from None
        return tracker

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def write(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in scalars.items()])

    def finish(self, run_dir: Path, ok: bool) -> None:
        for name in ("summary.json", "config.json"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for sdir in sorted(p for p in run_dir.glob("[0-9][0-9]_*") if p.is_dir()):
            for path in stage_files(sdir, self.log_models):
                self.client.log_artifact(self.run_id, str(path), artifact_path=sdir.name)
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def stage_files(sdir: Path, log_models: bool) -> list[Path]:
    """A stage dir's records, and its model file (named in stage.json) when asked for."""
    files = [sdir / n for n in ("metrics.json", "stage.json") if (sdir / n).is_file()]
    if log_models and files and files[-1].name == "stage.json":
        artifact = json.loads(files[-1].read_text()).get("artifact")
        if artifact and (sdir / artifact).is_file():
            files.append(sdir / artifact)
    return files


def resolve_uri(uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment; None = the store's default)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = Path.cwd() / "outputs" / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """An unreachable server fails in seconds instead of MLflow's minutes of retries."""
    saved = {k: os.environ.get(k) for k in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def flat_params(config: Any) -> dict[str, str]:
    """The resolved config as MLflow params: dot keys, values as they would be written in an
    override (strings as they are, the rest as JSON: 2, 0.1, null, true, [1, 8])."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    out: dict[str, str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = (value if isinstance(value, str)
                                         else json.dumps(value, default=str))
    walk(tree, "")
    return out
