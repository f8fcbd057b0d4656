"""A CPU thread budget per job: `runtime.threads`, applied with `torch.set_num_threads` before any work.

Why: torch's OpenMP pool spins at barriers. Two jobs that each start torch with all the machine's
threads (or one job while another process holds a core) do not share the cores, they collapse
(seen here: 30x slower). So every run fixes its thread count up front and records it.

`runtime.threads` (conf/runtime/default.yaml):
* `auto` (default): the cores this process may use, divided by the jobs running at once.
  - cores: the fewest of the CPU affinity mask, the cgroup CPU quota (v2 `cpu.max`, v1
    `cpu.cfs_quota_us`) and `SLURM_CPUS_PER_TASK`;
  - jobs at once (Hydra multirun only, read from `HydraConfig.get().launcher` at job time): the
    joblib launcher's `n_jobs` (-1 = one per core, as joblib reads it), or a submitit launcher's
    `cpus_per_task` (cores per job) -- a sequential launcher runs one job at a time;
  - an `OMP_NUM_THREADS` set in the environment caps it (an explicit limit is never raised;
    joblib's workers also get `OMP_NUM_THREADS = cores // n_jobs` from joblib itself).
* an integer 1..cores: exactly that many threads; with a parallel launcher, jobs x threads must fit
  in the cores.
* null: leave torch's own default (all cores, or `OMP_NUM_THREADS`); still recorded.

`apply(setting)` returns the record that goes into `result.json["runtime"]`: threads and inter-op
threads in effect, the setting, where the value came from, the cores available and the host's
core count (bf16 sums can differ in the last digits with the thread count).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
KEY = "runtime.threads"
CGROUP_ROOT = Path("/sys/fs/cgroup")


# ----------------------------------------------------------------------------- sources
def host_cores() -> int:
    """Logical cores of the machine (not of this process)."""
    return os.cpu_count() or 1


def affinity_cores() -> int:
    """Cores in this process's CPU affinity mask (`taskset`, SLURM/cpuset binding)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return host_cores()


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """Candidate cgroup folders of this process: its own path from /proc/self/cgroup, then the mount
    root (inside a container the own path is usually not visible and the root is the container's)."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controller == "" and controllers == "":  # v2 unified hierarchy
                dirs.append(root / path.lstrip("/"))
            elif controller and controller in controllers.split(","):
                dirs.append(root / controllers / path.lstrip("/"))
    except (OSError, ValueError):
        pass
    return [*dirs, root if controller == "" else root / controller]


def cgroup_quota_cores(root: Path | None = None) -> int | None:
    """CPU quota of this process's cgroup in whole cores (rounded up), None when unlimited or absent.
    cgroup v2: `cpu.max` = "<quota> <period>" or "max <period>"; v1: `cpu.cfs_quota_us` (-1 =
    unlimited) / `cpu.cfs_period_us`."""
    root = root or CGROUP_ROOT
    for d in _cgroup_dirs(root, ""):
        f = d / "cpu.max"
        if f.is_file():
            quota, _, period = f.read_text().strip().partition(" ")
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period or 100000)))
    for d in _cgroup_dirs(root, "cpu"):
        q, p = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
        if q.is_file() and p.is_file():
            quota = int(q.read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / int(p.read_text())))
    return None


def _positive_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def available_cores() -> tuple[int, str]:
    """(cores this process may use, what bounds it): the fewest of affinity, cgroup quota, SLURM."""
    sources = [(affinity_cores(), "CPU affinity")]
    quota = cgroup_quota_cores()
    if quota is not None:
        sources.append((quota, "cgroup CPU quota"))
    slurm = _positive_env("SLURM_CPUS_PER_TASK")
    if slurm is not None:
        sources.append((slurm, f"SLURM_CPUS_PER_TASK={slurm}"))
    return min(sources, key=lambda s: s[0])


def hydra_launcher() -> dict | None:
    """The launcher config of the running Hydra multirun job (`HydraConfig.get().launcher`), else None
    (a single run, or outside Hydra: one job at a time)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return None
    return OmegaConf.to_container(hc.launcher, resolve=True)


def per_job_cores(launcher: dict | None, cores: int, cores_source: str = "") -> tuple[int, str, int]:
    """(cores one job may use, why, jobs at once) under `launcher` (a Hydra launcher config as a dict).

    joblib: `n_jobs` jobs at once share the cores (negative n_jobs as joblib reads it: cores + 1 +
    n_jobs); submitit: each job gets `cpus_per_task` cores; anything else: one job at a time."""
    launcher = launcher or {}
    have = f"{cores} cores ({cores_source})" if cores_source else f"{cores} cores"
    if "n_jobs" in launcher:
        n = launcher["n_jobs"]
        if isinstance(n, bool) or not isinstance(n, int) or n == 0:
            raise ValueError(f"hydra.launcher.n_jobs={n!r}: must be a non-zero integer (-1 = one job per core)")
        jobs = n if n > 0 else max(1, cores + 1 + n)
        return max(1, cores // jobs), f"{have} / {jobs} jobs (hydra.launcher.n_jobs={n})", jobs
    cpt = launcher.get("cpus_per_task")
    if cpt:
        return min(cores, int(cpt)), f"hydra.launcher.cpus_per_task={cpt} of {have}", 1
    return cores, f"{have}, one job at a time", 1


# ----------------------------------------------------------------------------- budget
def parse(setting, cores: int, cores_source: str) -> int | str | None:
    """`runtime.threads` checked: "auto", None, or an int in 1..cores (digit strings allowed);
    anything else is a ValueError naming the key, the value and what is allowed."""
    if setting is None or setting == "auto":
        return setting
    value = setting
    if isinstance(setting, str) and setting.strip().isdigit():
        value = int(setting)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cores:
        raise ValueError(f"{KEY}={setting!r}: use 'auto', null (torch's default) or an integer 1..{cores} "
                         f"(this process has {cores} cores: {cores_source})")
    return value


def budget(setting, cores: int, cores_source: str, launcher: dict | None = None,
           omp_threads: int | None = None) -> tuple[int | None, str, list[str]]:
    """(threads per job or None = leave torch alone, where the value came from, warnings).

    `launcher`: the Hydra launcher config of a multirun job (None: one job at a time);
    `omp_threads`: a positive `OMP_NUM_THREADS` from the environment, which caps `auto`."""
    setting = parse(setting, cores, cores_source)
    share, why, jobs = per_job_cores(launcher, cores, cores_source)
    warnings = []
    if jobs > cores:
        warnings.append(f"{why}: more jobs at once than cores, oversubscribed even at 1 thread per job; "
                        "lower hydra.launcher.n_jobs")
    if setting is None:
        return None, f"{KEY}=null: torch's default", warnings
    if setting == "auto":
        if omp_threads is not None and omp_threads < share:
            return omp_threads, f"auto: {why}, capped by OMP_NUM_THREADS={omp_threads}", warnings
        return share, f"auto: {why}", warnings
    if setting * jobs > cores:
        raise ValueError(f"{KEY}={setting} with {jobs} jobs at once ({why}) asks for {setting * jobs} threads "
                         f"on {cores} cores; use {KEY}=auto (= {share}) or fewer jobs")
    return setting, f"{KEY}={setting}", warnings


def apply(setting) -> tuple[dict, list[str]]:
    """Check `runtime.threads`, set torch's intra-op (and, if the pool has not started yet, inter-op)
    threads. Returns (the record for `result.json["runtime"]`, warnings for `result["warnings"]`).
    Call it before any model loads or any torch work."""
    cores, cores_source = available_cores()
    threads, source, warnings = budget(setting, cores, cores_source, hydra_launcher(),
                                       _positive_env("OMP_NUM_THREADS"))
    if threads is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # set before, or inter-op work already ran in this process: keep it
            pass
    for w in warnings:
        log.warning("thread budget: %s", w)
    record = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
              "setting": setting, "source": source, "cores": cores, "cores_source": cores_source,
              "host_cores": host_cores()}
    log.info("thread budget: %d threads (%s)", record["threads"], source)
    return record, [f"runtime: {w}" for w in warnings]
