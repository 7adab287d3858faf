"""The `effrun` command: Hydra composes the config, the pipeline runs it.

Configs ship inside the package (effrun/configs; the repo's top-level configs/ links there) and
are found by absolute path, so effrun runs from any working directory, installed or editable.

Errors: a ConfigError (exit 2) or EffrunError (exit 1) is one line on stderr and in the run's
effrun.log; anything else is a bug and shows its traceback. The job itself never exits the
process: in a multirun a failed job is recorded (error.txt in its job dir) and the other jobs
run on; the command exits non-zero at the end, after one line per failed job. Launchers that run
jobs in other processes (joblib, submitit) cannot report back in memory, so the list comes from
the sweep dir's error.txt files (the ListFailures callback says where the sweep went).

Under torchrun (effrun/distributed.py) every rank runs this command: `main` joins the ranks
before Hydra composes, so that they name one run dir from rank 0's clock (`effrun.now`), and
only rank 0 logs to the run dir and reports errors (a rank's own error it reports too).

Sweeps: job dirs are named `<job num>_<overrides>`; under hydra/launcher=joblib each job gets
cores / n_jobs torch threads; under hydra/sweeper=optuna a job returns the objectives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from effrun import distributed
from effrun.errors import ConfigError, EffrunError
from effrun.schema import config_dir, register_schemas

register_schemas()  # before Hydra composes: the YAML options extend these schemas
log = logging.getLogger("effrun")
# Optuna imports alembic, whose plugin set-up would fill the sweep's log at Hydra's INFO level.
logging.getLogger("alembic").setLevel(logging.WARNING)

EXIT_CODES = {ConfigError: 2, EffrunError: 1}


@dataclass
class JobFailure:
    run_dir: Path
    message: str
    exit_code: int
    multirun: bool


# Jobs of this process that failed with a user error (Hydra's basic launcher runs multirun jobs
# in this process, one after the other).
FAILURES: list[JobFailure] = []
# Sweep dirs of this process's multiruns (ListFailures), and when the command started: error.txt
# files older than that are from an earlier sweep into the same dir.
SWEEP_DIRS: list[Path] = []
STARTED = time.time()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> dict | float | list[float] | None:
    """One job: run the pipeline; returns the run's headline figures, or under the optuna
    sweeper its objectives (sweep_objectives, objective_values); None when the job failed."""
    from effrun import pipeline
    from effrun.summary import headline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if distributed.is_main():
        with contextlib.suppress(OSError):  # a rerun or requeued job starts clean
            (run_dir / "error.txt").unlink(missing_ok=True)
    else:  # torchrun: rank 0 logs and reports for all
        quiet_log()
    try:
        objectives = sweep_objectives(hydra_cfg)
        if objectives:
            check_objectives_measured(cfg)
        share_cores(cfg, hydra_cfg)
        rows = pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task))
        if not objectives:
            return headline(rows)
        values = objective_values(headline(rows), objectives, cfg.benchmark.latency_budget_ms)
        log.info("objectives for the optuna sweeper %s: %s", objectives, values)
        return values
    except (ConfigError, EffrunError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_failure(run_dir, e)
        return None
    except KeyboardInterrupt as e:
        if not distributed.is_main():  # torchrun stops the other ranks when one fails
            raise
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"\neffrun: {what}; training resumes from its last checkpoint (each epoch, or "
              f"train.checkpoint_every steps). Resume with: effrun "
              f"<same overrides> hydra.run.dir={run_dir}", file=sys.stderr)
        raise


def report_failure(run_dir: Path, error: Exception) -> None:
    """One line on stderr and in the job's log; error.txt in the job's dir."""
    message = str(error)
    logging.getLogger("effrun").error("%s", message)
    code = next(c for kind, c in EXIT_CODES.items() if isinstance(error, kind))
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    FAILURES.append(JobFailure(run_dir, message, code, multirun))
    if not distributed.is_main():  # the exit code only: rank 0 reports what all ranks found
        if not (isinstance(error, ConfigError) or getattr(error, "forwarded", False)):
            rank = distributed.rank_and_world()[0]
            print(f"effrun: error on rank {rank}: {message}", file=sys.stderr)
        return
    print(f"effrun: error: {message}  (HYDRA_FULL_ERROR=1 shows the traceback)",
          file=sys.stderr)
    try:  # the exit code too: a job in another process reports back through this file only
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{message}\nexit code: {code}\n")
    except OSError:  # the run dir itself may be what failed
        pass


# ---------------------------------------------------------------- sweeps

def job_dir_name(num: int, overrides: str) -> str:
    """hydra.sweep.subdir: the job's number, then its overrides (hydra.job.override_dirname) as
    one safe path component: group slashes become dots, other characters a shell would trip
    on become _, at most 200 of them (the number keeps names unique). No overrides: the number."""
    name = re.sub(r"[^\w.=,+\-\[\]:@%]", "_", str(overrides).replace("/", "."))[:200]
    return f"{num}_{name}" if name else str(num)


# Registered on import: every process that runs jobs imports this module to unpickle the task.
OmegaConf.register_new_resolver("effrun.job_dir", job_dir_name, replace=True)
# The run dir's timestamp (configs/config.yaml): the same on every rank of a torchrun job.
# Cached in the config like Hydra's own `now`: a job that a launcher runs in another process
# (joblib, submitit) gets the config with the value its sweep dir was named from.
OmegaConf.register_new_resolver(
    "effrun.now", lambda pattern: distributed.started().strftime(pattern), replace=True,
    use_cache=True)


def quiet_log() -> None:
    """A rank other than 0 logs nothing: rank 0 writes effrun.log and the console, and the
    ranks run the same code (torchrun would show every line once per rank). An error of this
    rank's own is still printed (report_failure), a bug's traceback too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.CRITICAL)


def share_cores(cfg: DictConfig, hydra_cfg) -> None:
    """Under hydra/launcher=joblib, the parallel jobs split the cores instead of each starting
    a torch thread per core: hardware.threads = cores // n_jobs, unless hardware.threads is set.
    OMP_NUM_THREADS, where set, is the count: joblib passes a user's value on to its workers
    and otherwise sets exactly this share there."""
    launcher = hydra_cfg.get("launcher") or {}
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return
    if cfg.hardware.threads is not None:
        log.info("joblib launcher: hardware.threads=%d as set", cfg.hardware.threads)
        return
    import joblib

    n_jobs, cores = joblib.effective_n_jobs(launcher.get("n_jobs", -1)), joblib.cpu_count()
    threads, source = max(1, cores // n_jobs), f"{cores} cores // {n_jobs} jobs"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0 and int(omp) != threads:
        threads, source = int(omp), "OMP_NUM_THREADS"
    cfg.hardware.threads = threads
    log.info("joblib launcher: %d torch thread(s) per job (%s)", threads, source)


def sweep_objectives(hydra_cfg) -> list[str] | None:
    """Under hydra/sweeper=optuna, the study's directions: [maximize] (top-1, within
    benchmark.latency_budget_ms if set) or [maximize, minimize] (top-1, batch-1 latency);
    None under other sweepers."""
    sweeper = hydra_cfg.get("sweeper") or {}
    if "optuna" not in str(sweeper.get("_target_", "")):
        return None
    direction = sweeper.get("direction")
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    directions = [getattr(d, "name", str(d)) for d in directions]
    if directions not in (["maximize"], ["maximize", "minimize"]):
        raise ConfigError(f"hydra.sweeper.direction must be maximize (top-1 accuracy) or "
                          f"[maximize, minimize] (top-1, batch-1 latency), got {directions}")
    return directions


def check_objectives_measured(cfg: DictConfig) -> None:
    if "benchmark" not in cfg.stages or 1 not in cfg.benchmark.batch_sizes:
        raise ConfigError("the optuna sweeper's objectives are measured by the benchmark stage "
                          "at batch size 1: add benchmark to stages and 1 to "
                          "benchmark.batch_sizes")


def objective_values(head: dict, directions: list[str],
                     budget: float | None = None) -> float | list[float]:
    """The final model's top-1 (and batch-1 p50 latency in ms), from summary.json's headline.
    Over a latency budget the single objective is -latency / budget: below every trial within
    budget (top-1 >= 0), and closer to the budget ranks higher."""
    accuracy, latency = head["accuracy"], head["latency_ms_p50_bs1"]
    if len(directions) == 2:
        return [accuracy, latency]
    if budget is not None and latency > budget:
        log.info("latency %.3f ms is over the %.3f ms budget: objective %.3f", latency, budget,
                 -latency / budget)
        return -latency / budget
    return accuracy


class ListFailures(Callback):
    """Notes where a multirun's jobs went (on_multirun_end runs in the command's own process,
    whichever launcher ran the jobs), for main() to list the jobs that failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        SWEEP_DIRS.append(Path(str(config.hydra.sweep.dir)))


def sweep_failures() -> list[JobFailure]:
    """Failed jobs of this command's sweeps, from their error.txt (older ones are from an
    earlier sweep into the same dir), with the in-process ones (FAILURES) each listed once."""
    found = {failure.run_dir.resolve(): failure for failure in FAILURES}
    for sweep_dir in SWEEP_DIRS:
        for path in sorted(sweep_dir.rglob("error.txt")):
            if path.parent.resolve() in found or path.stat().st_mtime < STARTED:
                continue
            message, _, rest = path.read_text().partition("\n")
            code = re.search(r"exit code: (\d+)", rest)
            found[path.parent.resolve()] = JobFailure(path.parent, message,
                                                      int(code.group(1)) if code else 1, True)
    return list(found.values())


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before a kill), handled like Ctrl-C."""


def on_signal(signum: int, _frame) -> None:
    """First SIGINT/SIGTERM: stop like Ctrl-C (checkpoint kept, resume hint, exit 130/143);
    a second one while stopping: exit at once."""
    if getattr(on_signal, "received", False):
        os._exit(128 + signum)
    on_signal.received = True
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main() -> None:
    global STARTED
    FAILURES.clear()
    SWEEP_DIRS.clear()
    STARTED = time.time() - 1  # file times can be a second coarse
    on_signal.received = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    hydra_exit = 0
    distributed.init()  # torchrun: join the other ranks; nothing without it
    try:
        _main()
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit as e:  # Hydra reported an error of its own, e.g. the optuna sweeper's
        hydra_exit = e.code if isinstance(e.code, int) else 1  # when no trial completed
    distributed.finish()
    failures = sweep_failures()
    if any(failure.multirun for failure in failures):
        print(f"effrun: {len(failures)} job(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure.run_dir}: {failure.message}", file=sys.stderr)
    if failures or hydra_exit:
        sys.exit(max([hydra_exit] + [failure.exit_code for failure in failures]))


if __name__ == "__main__":
    main()
