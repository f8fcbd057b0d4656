"""Command line: `python run.py model=... pruner=... patch=...` (one run) or `sweeps=<name>` (a grid).

A thin Hydra shim over `lp.run.run(cfg)`. Bad input ends with a one-line error and exit code 2.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from lp.run import run

log = logging.getLogger("lp")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, TypeError) as e:
        if multirun:  # keep the sweep going; the job's result.json records the failure
            log.error("job failed: %s: %s", type(e).__name__, e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
