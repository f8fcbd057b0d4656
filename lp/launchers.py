"""Collecting submitit jobs so that a sweep is never lost (`hydra/launcher=slurm` and `hydra/launcher=local`).

The plugin's `submitit_slurm` / `submitit_local` collect the jobs with `[job.results()[0] for job in
jobs]`: one job that ends without a result (killed by SIGKILL or the out-of-memory killer, a node
failure, `scancel` after its grace time, requeued too often) raises there, the jobs after it are not
waited for (submitit_local cancels them) and Hydra never calls the end-of-sweep callbacks. The
plugin classes in `hydra_plugins/lp_launcher` (Hydra requires launchers there) add :class:`Collecting`
to the plugin's: they submit exactly as the plugin does and then wait for *every* job; a job without a result
gets a `result.json` with `status: failed` and submitit's reason in its job dir (unless it wrote one
itself), is logged, and counts as a failed job: the sweep is aggregated and exits 1.

Preemption and timeouts stay submitit's: its signal (USR2, `signal_delay_s` before the limit)
checkpoints the job through the launcher's `checkpoint` (the same job, resubmitted) and requeues it,
up to `max_num_timeout` timeouts (`conf/hydra/launcher/slurm.yaml`); see `run.py`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


class Collecting:
    """Mixin over the plugin's launchers: `launch` waits for every job and records lost ones."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        jobs = []
        real = submitit.AutoExecutor.map_array

        def map_array(executor, *args, **kwargs):  # the plugin's submission, unchanged; keep the handles
            jobs.extend(real(executor, *args, **kwargs))
            return []  # the plugin then collects nothing: results are gathered below

        submitit.AutoExecutor.map_array = map_array
        try:
            super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        finally:
            submitit.AutoExecutor.map_array = real
        returns = []
        for k, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True)):
            try:
                returns.append(job.results()[0])
            except Exception as e:  # noqa: BLE001 - whatever ended the job without a result
                returns.append(self._lost(job, list(overrides), initial_job_idx + k, e))
        return returns

    def _lost(self, job, overrides: list[str], num: int, error: Exception) -> JobReturn:
        """A failed `result.json` for a job that produced no result (kept if the job wrote one)."""
        why = " ".join(str(error).strip().splitlines()[:2]) or type(error).__name__  # submitit: path, then state
        job_dir = self._job_dir(overrides, num)
        log.error("job %d (submitit job %s) ended without a result: %s", num + 1, job.job_id, why)
        path = job_dir / "result.json"
        try:
            current = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            current = None
        if not isinstance(current, dict) or current.get("status") in (None, "running"):
            from lp.record import write_json_atomic

            write_json_atomic(path, {"status": "failed", "error": f"lost: submitit job {job.job_id} ended without a "
                                     f"result ({type(error).__name__}: {why})", "overrides": overrides,
                                     "submitit_job_id": str(job.job_id)})
        ret = JobReturn(overrides=overrides, working_dir=str(job_dir), status=JobStatus.COMPLETED)
        ret.return_value = None  # as a job that failed inside lp: recorded, and the sweep goes on
        return ret

    def _job_dir(self, overrides: list[str], num: int) -> Path:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)  # type: ignore[attr-defined]
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return Path(str(self.config.hydra.sweep.dir)) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))  # type: ignore[attr-defined]

