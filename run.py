"""Command line: `python run.py model=... pruner=... patch=...` (one run) or `sweeps=<name>` (a grid).

A thin Hydra shim over `lp.run.run(cfg)`. One run: bad input ends with a one-line error and exit
code 2; any other error propagates (traceback, exit 1). Multirun (a `sweeps=` preset or `-m`): a
failing job is logged and recorded as failed in its result.json, and the sweep goes on; a job whose
identical configuration already finished in an earlier run of the same sweep is skipped and its
result copied in (`resume=false` or `force=true` re-runs it; see `lp.callbacks`); once every job
ended and the tables are written, the sweep exits 1 if any job failed. SIGTERM (preemption, `kill`)
ends a run like Ctrl-C: result.json with status failed, exit 143.
"""

import logging
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lp import callbacks
from lp.callbacks import resume_job
from lp.run import hydra_runtime, run
from lp.tracking import log_finished

log = logging.getLogger("lp")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    signal.signal(signal.SIGTERM, terminated)  # SLURM preemption, `kill`: result.json says failed, like Ctrl-C
    if multirun and cfg.resume and not cfg.force:
        prev = resume(cfg, hc)
        if prev is not None:
            return prev
    try:
        return run(cfg)
    except (ValueError, FileNotFoundError, TypeError) as e:  # bad input: one line
        if multirun:
            log.error("job failed: %s: %s", type(e).__name__, e)
            return None
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # anything else: full traceback; in a sweep the other jobs still run
        if not multirun:
            raise
        log.exception("job failed: %s: %s", type(e).__name__, e)
        return None


def resume(cfg: DictConfig, hc) -> dict | None:
    """The earlier result of this job if it already finished (copied into its dir), else None."""
    choices, overrides = hydra_runtime()
    try:
        prev = resume_job(cfg, hc.runtime.output_dir, hc.sweep.dir,
                          {**choices, "model": choices.get("model", cfg.model.name)}, overrides)
    except Exception:  # noqa: BLE001 - looking for earlier results must never cost the job
        log.warning("resume check failed; running the job", exc_info=True)
        return None
    if prev is not None:
        where = Path(prev.get("resumed_from", Path(hc.runtime.output_dir) / "result.json")).parent
        log.info("job %d skipped: %s already finished in %s (force=true re-runs it)",
                 hc.job.num + 1, prev.get("name"), where)
        log_finished(cfg, Path(hc.runtime.output_dir), prev)  # the tracker still gets every job
    return prev


class Terminated(BaseException):
    """SIGTERM received: ends the run (and a sweep) like KeyboardInterrupt, recorded as failed."""


def terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated("terminated by SIGTERM (preempted or killed)")


if __name__ == "__main__":
    try:
        main()
    except Terminated as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    sys.exit(callbacks.sweep_exit_code())  # a sweep with a failed job exits 1 (after its tables are written)
