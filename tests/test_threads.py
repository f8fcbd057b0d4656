"""Thread budget (`runtime.threads`, lp/threads.py): each source, the rules, applied before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONF, DATA, REPO, TINY
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from lp import models, threads
from lp.run import run


@pytest.fixture(autouse=True)
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake 8-core machine: affinity 8 cores, no cgroup quota, no SLURM, no OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path / "cgroup")
    for var in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(threads.torch, "set_num_interop_threads", lambda n: None)  # once per process
    return tmp_path / "cgroup"


# ----------------------------------------------------------------------------- cores available
def test_cores_from_affinity(machine):
    assert threads.available_cores() == (8, "CPU affinity")


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "300000 100000\n"}, 3),          # cgroup v2: 3 cores
    ({"cpu.max": "150000 100000\n"}, 2),          # 1.5 cores rounds up
    ({"cpu.max": "max 100000\n"}, None),          # unlimited
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota(machine, files, cores):
    for name, text in files.items():
        (machine / name).parent.mkdir(parents=True, exist_ok=True)
        (machine / name).write_text(text)
    assert threads.cgroup_quota_cores() == cores
    expected = (cores, "cgroup CPU quota") if cores else (8, "CPU affinity")
    assert threads.available_cores() == expected


def test_cores_from_slurm(machine, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert threads.available_cores() == (3, "SLURM_CPUS_PER_TASK=3")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # more than the affinity mask: the mask binds
    assert threads.available_cores() == (8, "CPU affinity")


# ----------------------------------------------------------------------------- budget
@pytest.mark.parametrize("launcher, threads_, jobs", [
    (None, 8, 1),                                         # single run / basic launcher
    ({"_target_": "x.BasicLauncher"}, 8, 1),
    ({"n_jobs": 2}, 4, 2),                                # joblib: cores / n_jobs
    ({"n_jobs": 3}, 2, 3),
    ({"n_jobs": -1}, 1, 8),                               # joblib: -1 = one job per core
    ({"n_jobs": -5}, 2, 4),                               # cores + 1 + n_jobs
    ({"n_jobs": 16}, 1, 16),                              # more jobs than cores: 1 thread (and a warning)
    ({"cpus_per_task": 3, "tasks_per_node": 1}, 3, 1),    # submitit: cpus_per_task per job
    ({"cpus_per_task": None}, 8, 1),
])
def test_auto_divides_the_cores_by_the_jobs_at_once(launcher, threads_, jobs):
    n, source, warnings = threads.budget("auto", 8, "CPU affinity", launcher)
    assert n == threads_ and source.startswith("auto: ")
    assert bool(warnings) == (jobs > 8)
    if launcher and "n_jobs" in launcher:
        assert source == f"auto: 8 cores (CPU affinity) / {jobs} jobs (hydra.launcher.n_jobs={launcher['n_jobs']})"


def test_omp_num_threads_caps_auto_never_raises_it():
    assert threads.budget("auto", 8, "aff", None, omp_threads=1)[:2] == (1, "auto: 8 cores (aff), one job at a time, "
                                                                          "capped by OMP_NUM_THREADS=1")
    assert threads.budget("auto", 8, "aff", {"n_jobs": 4}, omp_threads=6)[0] == 2
    assert threads.budget(3, 8, "aff", None, omp_threads=1)[0] == 3  # an explicit setting wins


def test_explicit_and_null():
    assert threads.budget(4, 8, "aff", {"n_jobs": 2})[:2] == (4, "runtime.threads=4")
    assert threads.budget("8", 8, "aff")[0] == 8
    assert threads.budget(None, 8, "aff")[:2] == (None, "runtime.threads=null: torch's default")


@pytest.mark.parametrize("bad", [0, -1, 9, "two", "", "1.5", 1.5, True, "auto2", [2]])
def test_bad_values_are_one_line_errors_naming_the_key(bad):
    with pytest.raises(ValueError) as e:
        threads.budget(bad, 8, "CPU affinity")
    msg = str(e.value)
    assert msg.startswith(f"runtime.threads={bad!r}: ") and "\n" not in msg
    assert "integer 1..8" in msg and "8 cores: CPU affinity" in msg


def test_more_threads_than_the_jobs_can_share_is_rejected():
    with pytest.raises(ValueError, match=r"runtime.threads=2 with 8 jobs at once .* asks for 16 threads on 8 "
                                         r"cores; use runtime.threads=auto \(= 1\)"):
        threads.budget(2, 8, "aff", {"n_jobs": -1})
    with pytest.raises(ValueError, match=r"hydra.launcher.n_jobs=0: must be a non-zero integer"):
        threads.budget("auto", 8, "aff", {"n_jobs": 0})


# ----------------------------------------------------------------------------- Hydra at job time
@pytest.mark.parametrize("launcher, mode, expected", [
    ("joblib", "MULTIRUN", 4), ("basic", "MULTIRUN", 8), ("joblib", "RUN", 8)])
def test_launcher_read_from_hydra_at_job_time(machine, tmp_path, launcher, mode, expected):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.output_dir={tmp_path}", f"hydra/launcher={launcher}",
                                           "hydra.launcher.n_jobs=2" if launcher == "joblib" else "seed=0",
                                           f"hydra.mode={mode}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        record, _ = threads.apply(cfg.runtime.threads)
    finally:
        HydraConfig.instance().cfg = None
    assert record["threads"] == torch.get_num_threads() == expected
    assert record["setting"] == "auto" and record["cores"] == 8 and record["host_cores"] == os.cpu_count()
    assert ("n_jobs=2" in record["source"]) == (expected == 4)


# ----------------------------------------------------------------------------- in the pipeline
def test_applied_before_the_model_loads_and_recorded(cfg_factory, tmp_path, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        raise RuntimeError("stop after the load started")

    torch.set_num_threads(2)
    monkeypatch.setattr(models, "load_model", spy)
    with pytest.raises(RuntimeError, match="stop after"):
        run(cfg_factory(*TINY, "runtime.threads=1"))
    assert seen["threads"] == 1
    record = json.loads((tmp_path / "result.json").read_text())["runtime"]
    assert record["threads"] == 1 and record["setting"] == 1 and record["source"] == "runtime.threads=1"
    assert record["host_cores"] == os.cpu_count() and record["cores"] >= 1


def test_recorded_in_a_finished_run(cfg_factory):
    result = run(cfg_factory(*TINY, "runtime.threads=1"))
    assert result["status"] == "ok" and result["runtime"]["threads"] == 1
    assert result["runtime"]["cores_source"] and result["runtime"]["interop_threads"] >= 1


def test_bad_value_fails_before_loading(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"^runtime.threads=0: "):
        run(cfg_factory(*TINY, "runtime.threads=0"))
    failed = json.loads((tmp_path / "result.json").read_text())
    assert failed["status"] == "failed" and "load" not in failed["timing"]


@pytest.mark.slow
def test_cli_bad_value_is_one_line(tmp_path):
    too_many = os.cpu_count() + 1
    proc = subprocess.run([sys.executable, "run.py", *TINY, f"runtime.threads={too_many}", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "LP_DATA_DIR": str(DATA)},
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: runtime.threads={too_many}: use 'auto'")


@pytest.mark.slow
def test_parallel_launcher_jobs_get_their_share(tmp_path):
    """hydra/launcher=parallel: each joblib worker reads n_jobs=2 from Hydra at job time."""
    env = {**os.environ, "LP_DATA_DIR": str(DATA), "HYDRA_FULL_ERROR": "0"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "sweeps=tiny_smoke", "hydra/launcher=parallel",
                           "hydra/sweeper=basic", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [json.loads(p.read_text())["runtime"] for p in tmp_path.glob("*/result.json")]
    cores = threads.available_cores()[0]
    assert len(runs) == 2 and all(r["threads"] == max(1, cores // 2) for r in runs)
    assert all(r["source"].endswith("/ 2 jobs (hydra.launcher.n_jobs=2)") for r in runs)
