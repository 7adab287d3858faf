"""The `effrun` command: Hydra composes the config, the pipeline runs it.

Configs ship inside the package (effrun/configs; the repo's top-level configs/ links there) and
are found by absolute path, so effrun runs from any working directory, installed or editable.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from effrun.schema import ConfigError


def config_dir() -> str:
    return str(Path(__file__).resolve().parent / "configs")


# Failures a user can fix from the command line: one line, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> None:
    from effrun import pipeline
    from effrun.train import TrainingDiverged

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        pipeline.run(cfg, run_dir)
    except USER_ERRORS + (TrainingDiverged,) as e:
        if full:
            raise
        logging.getLogger("effrun").error("%s", e)
        print(f"effrun: error: {e}  (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr)
        sys.exit(2 if isinstance(e, USER_ERRORS) else 1)
    except KeyboardInterrupt:
        print(f"\neffrun: interrupted. Resume with: effrun <same overrides> "
              f"hydra.run.dir={run_dir}", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
