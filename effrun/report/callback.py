"""The Hydra callback that writes a study's report when it ends (effrun/configs/config.yaml,
`hydra.callbacks.report`): a single run reports on its own run dir, a multirun on its whole
sweep dir once every job has returned, whatever the launcher or sweeper. Turn it off with
`~hydra.callbacks.report`.

A report that cannot be written is one warning line: the runs themselves are done and their
JSON records are the source of truth.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from effrun import distributed

log = logging.getLogger("effrun")


class WriteReport(Callback):
    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        job_return = kwargs.get("job_return")
        hydra_cfg = getattr(job_return, "hydra_cfg", None)
        if hydra_cfg is None or not distributed.is_main():  # torchrun: rank 0 writes it
            return
        run_dir = Path(hydra_cfg.hydra.runtime.output_dir)
        if (run_dir / "summary.json").is_file():  # absent when the run failed
            write(run_dir, show_table=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if distributed.is_main() and any(sweep_dir.rglob("summary.json")):
            write(sweep_dir, show_table=True)


def write(path: Path, *, show_table: bool) -> None:
    from effrun.report import ReportError, report
    from effrun.report.writers import print_table

    try:
        rows, files = report([path])
    except (ReportError, OSError, ValueError) as err:
        log.warning("report: not written (%s); run effrun-report %s to retry", err, path)
        return
    if show_table:
        print_table(rows)
    log.info("report: %s (and report.csv, report.md, pareto.png beside it)", files["html"])
