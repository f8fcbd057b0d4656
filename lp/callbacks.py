"""Sweep machinery: Hydra callbacks (progress, aggregation) and resume of finished jobs.

Callbacks (registered in ``conf/config.yaml`` under ``hydra.callbacks``):

* :class:`SweepProgress` logs ``sweep <name>: N jobs -> <dir>`` when a multirun starts and
  ``job k/N: <overrides>`` when each job starts (k = ``hydra.job.num`` + 1).
* :class:`AggregateOnMultirunEnd` writes ``summary.csv``, ``table.md``, ``table.tex`` and
  ``dashboard.html`` into the sweep dir once every job returned (:func:`lp.aggregate.write_all`)
  and logs the ok/failed counts. It never raises: a failure is logged, the result files stay.
  Hydra calls ``on_multirun_end`` only when the launcher returns; a sweep that is interrupted
  (SIGTERM, Ctrl-C) or whose launcher raises (a submitit job killed without a result) is
  aggregated by :func:`finish_interrupted`, which the ``run.py`` shim calls on its way out.

Resume (called by the ``run.py`` shim for each multirun job, unless ``resume=false`` or
``force=true``): :func:`resume_job` looks for a result.json of every job of every earlier run of
the same sweep (:func:`sweep_family`: the sibling folders of ``hydra.sweep.dir`` when its parent is
``.../<sweep_name>``, as by default, else ``hydra.sweep.dir`` alone) with ``status: ok``, the same
``sweep_name`` and the same :func:`config_hash`. The
newest match is copied into the job dir (atomically) with ``resumed_from`` set, so aggregating the
new sweep dir sees the whole grid. Jobs that failed, crashed or were killed (no result.json, or
status failed/running) never match and run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lp.bookkeeping import BOOKKEEPING, PROGRESS

log = logging.getLogger(__name__)



def _multirun(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


# ------------------------------------------------------------------------------------ callbacks
def count_jobs(config: DictConfig) -> int | None:
    """Number of jobs of the multirun (see :func:`lp.sweeper.sweep_jobs`); None if unknown."""
    from lp.sweeper import sweep_jobs

    jobs = sweep_jobs(config)
    return None if jobs is None else len(jobs)


class SweepProgress(Callback):
    """Logs the sweep size at start and ``job k/N: <overrides>`` as each multirun job starts."""

    def __init__(self) -> None:
        self.total: int | None = None  # set in the launching process, pickled along to remote workers

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.total = count_jobs(config)
        resume = "off" if not config.get("resume", True) or config.get("force", False) else "on"
        log.info("sweep %s: %s jobs -> %s (resume %s)", config.get("sweep_name"),
                 self.total if self.total is not None else "?", config.hydra.sweep.dir, resume)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _multirun(config):
            log.info("job %d/%s: %s", config.hydra.job.num + 1, self.total if self.total is not None else "?",
                     " ".join(config.hydra.overrides.task))


_failed_sweeps: list[str] = []  # sweep dirs (this process) with a job that did not finish ok
_running_sweeps: dict[str, DictConfig] = {}  # sweep dir -> config, from on_multirun_start until aggregated


def sweep_exit_code() -> int:
    """1 if a sweep run by this process had a job that did not finish ok (or could not be aggregated)."""
    return 1 if _failed_sweeps else 0


def reaggregate_hint(sweep_dir: str | Path) -> str:
    """How to redo a sweep's tables by hand (after re-running its missing or failed jobs)."""
    return f"re-aggregate with `python -m lp aggregate {sweep_dir}`"


def aggregate_sweep(config: DictConfig, interrupted: str | None = None) -> None:
    """Write the tables of `config`'s sweep dir for whatever finished and log the outcome; never raises.
    `interrupted`: why the sweep stopped before every job returned (its exit code is then non-zero)."""
    sweep_dir = Path(config.hydra.sweep.dir)
    _running_sweeps.pop(str(sweep_dir), None)
    _failed_sweeps.append(str(sweep_dir))  # until aggregation shows every job ok
    try:
        from lp import aggregate
        from lp.report.messages import sweep_message

        paths = aggregate.write_all(sweep_dir)
        records = aggregate.load_results(sweep_dir)
        failed = interrupted is not None or any(r["status"] != "ok" for r in records)
        log.log(logging.WARNING if failed else logging.INFO, "%s", sweep_message(config.get("sweep_name"), records, paths))
        if interrupted is not None:
            log.error("sweep %s interrupted (%s): tables written for the %d jobs with a result; launch the same "
                      "sweep again to run the others (finished jobs are resumed), or %s", config.get("sweep_name"),
                      interrupted, len(records), reaggregate_hint(sweep_dir))
        elif failed:
            log.warning("launch the same sweep again to re-run the failed jobs (finished jobs are resumed); "
                        "or %s", reaggregate_hint(sweep_dir))
        else:
            _failed_sweeps.remove(str(sweep_dir))
    except Exception as e:  # noqa: BLE001 - the jobs' results are safe; aggregation can be redone
        from lp.report.results import NoResultsError

        if isinstance(e, NoResultsError):  # nothing finished (yet): no tables to write
            log.error("aggregating sweep %s: %s; once jobs have finished, %s", config.get("sweep_name"), e,
                      reaggregate_hint(sweep_dir))
        else:
            log.exception("aggregating %s failed; %s", sweep_dir, reaggregate_hint(sweep_dir))
    try:  # with a tracker: the aggregated tables and the dashboard's charts, in the sweep's group
        from lp import aggregate

        aggregate.log_sweep(config, sweep_dir)
    except Exception:  # noqa: BLE001 - the files above are the record; the tracker is a copy
        log.exception("logging the aggregated sweep %s to the tracker failed", sweep_dir)


def finish_interrupted(why: str) -> bool:
    """Aggregate every sweep this process started whose `on_multirun_end` never ran (the sweep was
    interrupted or its launcher raised); True if there was one (then :func:`sweep_exit_code` is 1)."""
    pending = list(_running_sweeps.values())
    for config in pending:
        aggregate_sweep(config, interrupted=why)
    return bool(pending)


class AggregateOnMultirunEnd(Callback):
    """Aggregates the sweep dir with :func:`lp.aggregate.write_all` after the last job; never raises.
    A job that did not finish ok makes :func:`sweep_exit_code` 1 (the `run.py` shim's exit code).
    The sweep is remembered from its start, so that :func:`finish_interrupted` can still aggregate it
    when Hydra never calls `on_multirun_end` (interrupted sweep, launcher error)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _running_sweeps[str(Path(config.hydra.sweep.dir))] = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        aggregate_sweep(config)


# --------------------------------------------------------------------------------------- resume
def _drop(d: dict, path: list[str]) -> None:
    head, *rest = path
    if not rest:
        d.pop(head, None)
    elif isinstance(d.get(head), dict):
        _drop(d[head], rest)


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != PROGRESS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def config_hash(config: dict | DictConfig) -> str:
    """SHA-256 (16 hex digits) of a resolved job config without its bookkeeping keys
    (:data:`lp.bookkeeping.BOOKKEEPING`, and :data:`~lp.bookkeeping.PROGRESS` keys at any depth).
    Two jobs with equal hashes compute the same thing (same code version assumed)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    config = json.loads(json.dumps(config, default=str))  # deep copy, plain JSON types (as in result.json)
    for key in BOOKKEEPING:
        _drop(config, key.split("."))
    text = json.dumps(_strip(config), sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_seen: dict[tuple[str, int], tuple | None] = {}  # (result.json, mtime_ns) -> (hash, sweep_name) if ok


def _ok_hash(path: Path) -> tuple | None:
    try:
        key = (str(path), path.stat().st_mtime_ns)
        if key not in _seen:
            r = json.loads(path.read_text())
            ok = isinstance(r, dict) and r.get("status") == "ok" and isinstance(r.get("config"), dict)
            _seen[key] = (config_hash(r["config"]), r["config"].get("sweep_name")) if ok else None
        return _seen[key]
    except (OSError, ValueError, TypeError):  # vanished, half-copied by hand, not JSON: not a match
        return None


def sweep_family(sweep_dir: str | Path, sweep_name: str | None) -> list[Path]:
    """The result.json files resume may reuse: every job of every run of the same sweep, i.e. of the
    sibling folders of `sweep_dir` when its parent is named after the sweep (the default layout
    `outputs/multirun/<sweep_name>/<timestamp>/<job>`), else only the jobs of `sweep_dir` itself
    (e.g. `hydra.sweep.dir=scratch/new` never reuses `scratch/other`)."""
    sweep = Path(sweep_dir).resolve()
    if sweep_name is not None and sweep.parent.name == str(sweep_name):
        return list(sweep.parent.glob("*/*/result.json"))
    return list(sweep.glob("*/result.json"))


def find_finished(config: dict | DictConfig, sweep_dir: str | Path) -> Path | None:
    """Newest result.json of :func:`sweep_family` with status ok, the same ``sweep_name`` and the
    config hash of ``config``; None if there is none."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    want = (config_hash(config), config.get("sweep_name"))
    found = [p for p in sweep_family(sweep_dir, want[1]) if _ok_hash(p) == want]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def resume_job(cfg: DictConfig, job_dir: str | Path, sweep_dir: str | Path,
               choices: dict | None = None, overrides: list[str] | None = None) -> dict | None:
    """If an identical job already finished ok (see :func:`find_finished`), write its result into
    ``job_dir/result.json`` with ``resumed_from`` (the copied file) and this job's ``choices`` and
    ``overrides``, and return it; else None (the job must run)."""
    from lp.record import write_json_atomic

    job_dir = Path(job_dir)
    prev = find_finished(cfg, sweep_dir)
    if prev is None:
        return None
    result = json.loads(prev.read_text())
    if prev.resolve() != (job_dir / "result.json").resolve():
        result["resumed_from"] = str(prev.resolve())
        if choices is not None:
            result["choices"] = choices
        if overrides is not None:
            result["overrides"] = list(overrides)
        write_json_atomic(job_dir / "result.json", result)
    return result

