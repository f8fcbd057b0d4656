"""Command line: `python run.py model=... pruner=... patch=...` (one run) or `sweeps=<name>` (a grid).

A thin Hydra shim over `lp.run.run(cfg)`. One run: bad input ends with a one-line error and exit
code 2; any other error propagates (traceback, exit 1). Multirun (a `sweeps=` preset or `-m`): a
failing job is logged and recorded as failed in its result.json, and the sweep goes on; a job whose
identical configuration already finished in an earlier run of the same sweep is skipped and its
result copied in (`resume=false` or `force=true` re-runs it; see `lp.callbacks`); once every job
ended and the tables are written, the sweep exits 1 if any job failed.

Signals:
* SIGTERM (`kill`, SLURM `scancel`) ends a single run, or a sweep run by this process (basic and
  joblib launchers, or the process launching submitit jobs), like Ctrl-C: the running job's
  result.json says failed, the tables are written for what finished, exit 143 and a line saying how
  to re-aggregate. A sweep whose launcher raises is aggregated the same way (exit 1).
* Inside a submitit job (`hydra/launcher=slurm`, `submitit_local`) submitit's own handlers stay:
  its preemption / timeout signal (USR2; SLURM sends it `signal_delay_s` before the limit) checkpoints
  the job through the launcher and requeues it (up to `max_num_timeout` timeouts); the job then runs
  again from the start in the same job folder, reusing the caches. A SIGTERM that is not part of a
  requeue ends only that job: result.json failed, and the job returns normally, so submitit stores a
  result, the launcher collects every job and the sweep is aggregated (exit 1).
"""

import json
import logging
import os
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
    in_submitit = submitit_job()
    handle_signals(in_submitit)
    if multirun and cfg.resume and not cfg.force:
        prev = resume(cfg, hc)
        if prev is not None:
            return prev
    try:
        return run(cfg)
    except Terminated as e:  # a submitit job: this job failed (result.json says so); the sweep goes on
        if not (multirun and in_submitit):
            raise
        log.error("job %d failed: %s", hc.job.num + 1, e)
        return None
    except SystemExit:
        if _requeued:  # submitit checkpointed and requeued this job: it runs again from the start
            note_requeued(Path(hc.runtime.output_dir))
        raise
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


_requeued = False  # set when submitit's preemption handler runs in this job


def terminated(signum, frame):
    if _requeued:  # the scheduler's SIGTERM after submitit requeued the job: already on its way out
        log.warning("SIGTERM ignored: this job was requeued by submitit")
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated("terminated by SIGTERM (preempted or killed)")


def submitit_job() -> bool:
    """True inside a job started by submitit (its job environment is set), False elsewhere."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return False
    try:
        import submitit

        submitit.JobEnvironment()
    except Exception:  # noqa: BLE001 - not importable or no known job environment: not a submitit job
        return False
    return True


def handle_signals(in_submitit: bool) -> None:
    """SIGTERM -> `Terminated`. In a submitit job, its preemption handler (USR2 by default) stays in
    charge and is only wrapped, so that the SIGTERM a scheduler sends after a requeue is ignored."""
    signal.signal(signal.SIGTERM, terminated)
    if not in_submitit:
        return
    import submitit

    usr = submitit.JobEnvironment._usr_sig()
    before = signal.getsignal(usr)
    if not callable(before) or getattr(before, "_lp_wrapped", False):
        return

    def preempted(signum, frame):
        global _requeued
        _requeued = True
        before(signum, frame)  # checkpoint (the launcher resubmits this job), requeue, sys.exit

    preempted._lp_wrapped = True
    signal.signal(usr, preempted)


def note_requeued(job_dir: Path) -> None:
    """Mark this job's failed result.json as requeued (its next run overwrites it)."""
    path = job_dir / "result.json"
    try:
        result = json.loads(path.read_text())
        result["error"] = f"requeued by submitit (preempted or timed out): {result.get('error')}"
        from lp.run import write_json_atomic

        write_json_atomic(path, result)
    except (OSError, ValueError):
        pass


def cli() -> int:
    """Run `main` and return the exit code. A sweep this process started that never reached Hydra's
    end-of-sweep callback (SIGTERM, Ctrl-C, a launcher that raised) is aggregated for what finished."""
    signal.signal(signal.SIGTERM, terminated)  # also while a launcher waits for its jobs
    code, why = 0, None
    try:
        main()
    except Terminated as e:
        print(f"error: {e}", file=sys.stderr)
        code, why = 128 + signal.SIGTERM, "SIGTERM"
    except KeyboardInterrupt:
        code, why = 130, "interrupted (Ctrl-C)"
    except SystemExit as e:  # Hydra exits 1 when the launcher raised; bad input exits 2
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        why = f"the launcher or Hydra failed (exit {code})" if code else None
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # aggregating must not be interrupted into a traceback
    if callbacks.finish_interrupted(why or "stopped before every job returned"):
        code = code or 1
    return code or callbacks.sweep_exit_code()  # a sweep with a failed job exits 1 (after its tables are written)


if __name__ == "__main__":
    sys.exit(cli())
