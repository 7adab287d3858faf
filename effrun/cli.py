"""The `effrun` command: Hydra composes the config, the pipeline runs it.

Configs ship inside the package (effrun/configs; the repo's top-level configs/ links there) and
are found by absolute path, so effrun runs from any working directory, installed or editable.

Errors: a ConfigError (exit 2) or EffrunError (exit 1) is one line on stderr and in the run's
effrun.log; anything else is a bug and shows its traceback. The job itself never exits the
process: in a multirun a failed job is recorded (error.txt in its job dir) and the other jobs
run on; the command exits non-zero at the end, after one line per failed job.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from effrun.errors import ConfigError, EffrunError
from effrun.schema import config_dir, register_schemas

register_schemas()  # before Hydra composes: the YAML options extend these schemas

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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> dict | None:
    """One job: run the pipeline; returns the run's headline figures (for a sweeper)."""
    from effrun import pipeline
    from effrun.summary import headline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return headline(pipeline.run(cfg, run_dir, list(hydra_cfg.overrides.task)))
    except (ConfigError, EffrunError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report_failure(run_dir, e)
        return None
    except KeyboardInterrupt as e:
        what = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(f"\neffrun: {what}; the last finished epoch is checkpointed. Resume with: effrun "
              f"<same overrides> hydra.run.dir={run_dir}", file=sys.stderr)
        raise


def report_failure(run_dir: Path, error: Exception) -> None:
    """One line on stderr and in the job's log; error.txt in the job's dir."""
    message = str(error)
    logging.getLogger("effrun").error("%s", message)
    code = next(c for kind, c in EXIT_CODES.items() if isinstance(error, kind))
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    FAILURES.append(JobFailure(run_dir, message, code, multirun))
    print(f"effrun: error: {message}  (HYDRA_FULL_ERROR=1 shows the traceback)",
          file=sys.stderr)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(message + "\n")
    except OSError:  # the run dir itself may be what failed
        pass


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
    FAILURES.clear()
    on_signal.received = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        _main()
    except Terminated:
        sys.exit(143)
    except KeyboardInterrupt:
        sys.exit(130)
    if not FAILURES:
        return
    if any(failure.multirun for failure in FAILURES):
        print(f"effrun: {len(FAILURES)} job(s) failed:", file=sys.stderr)
        for failure in FAILURES:
            print(f"  {failure.run_dir}: {failure.message}", file=sys.stderr)
    sys.exit(max(failure.exit_code for failure in FAILURES))


if __name__ == "__main__":
    main()
