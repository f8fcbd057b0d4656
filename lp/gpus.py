"""One GPU per job when a local launcher runs several jobs at once on a multi-GPU machine.

Which launchers: joblib (`hydra/launcher=parallel` / `joblib`, with n_jobs != 1) and submitit's local
executor (`hydra/launcher=local` / `submitit_local`: every job its own process, all at once). The
basic launcher runs one job at a time and SLURM gives each job its own allocation
(`CUDA_VISIBLE_DEVICES` set by SLURM), so neither is touched.

How: the job's process claims the first free GPU slot 0..n-1 (n = visible GPUs) with a non-blocking
`flock` on `<tmp>/lp-gpu-slots-<uid>/<GPU>.lock` (<GPU> = the `CUDA_VISIBLE_DEVICES` entry, else the
index) and keeps it for its lifetime (a joblib worker reuses it for every job it runs; the lock goes
when the process ends, also when it is killed), then makes it the current device
(`torch.cuda.set_device`): `model.device=auto|cuda` loads there, `cuda:0` stays GPU 0. Slots are per
machine, so two sweeps on one machine do not share either. More jobs at once than GPUs: the job
takes slot `job number mod n`, shared, with a warning.

Not assigned (recorded as None with the reason): no CUDA, `model.device=cpu` or an explicit
`cuda:<k>` (the user's choice), `model.device_map` set (the job spreads over every visible GPU).
`result.json["runtime"]["gpu"]` holds the record.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_held: tuple[int, int] | None = None  # (slot, lock fd) claimed by this process


def parallel_local(launcher: dict | None) -> bool:
    """True for a launcher that runs several jobs at once on this machine (joblib n_jobs != 1, submitit local)."""
    launcher = launcher or {}
    if "n_jobs" in launcher:
        return launcher["n_jobs"] != 1
    return "LocalLauncher" in str(launcher.get("_target_", ""))


def slot_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"lp-gpu-slots-{os.getuid()}"


def gpu_names(n: int) -> list[str]:
    """Identity of each visible GPU for its lock: the `CUDA_VISIBLE_DEVICES` entries, else 0..n-1."""
    env = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return env[:n] if len(env) >= n else [str(i) for i in range(n)]


def claim(n: int) -> int | None:
    """The slot (0..n-1) this process holds, claiming the first free one; None if all are taken."""
    global _held
    if _held is not None and _held[0] < n:
        return _held[0]
    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for slot, name in enumerate(gpu_names(n)):
        fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _held = (slot, fd)
        return slot
    return None


def release() -> None:
    """Give this process's slot back (processes normally keep it until they exit)."""
    global _held
    if _held is not None:
        os.close(_held[1])
        _held = None


def assign(device, device_map, launcher: dict | None, job_num: int = 0) -> tuple[dict | None, list[str]]:
    """Make this job's GPU the current CUDA device under a parallel local launcher; returns (record for
    `result.json["runtime"]["gpu"]` or None, warnings). See the module docstring for the rules."""
    if not parallel_local(launcher) or not torch.cuda.is_available():
        return None, []
    n = torch.cuda.device_count()
    if str(device) not in ("None", "auto", "cuda"):
        return {"index": None, "visible": n, "source": f"model.device={device}: not reassigned"}, []
    if device_map is not None:
        return {"index": None, "visible": n, "source": f"model.device_map={device_map}: every visible GPU"}, [
            f"gpu: model.device_map={device_map} under a parallel launcher: jobs at once share all {n} GPUs"]
    slot, warnings = claim(n), []
    if slot is None:
        slot = job_num % n
        source = f"shared slot {slot} (job {job_num} mod {n}): more jobs at once than GPUs"
        warnings.append(f"gpu: {source}; lower the jobs at once (hydra.launcher.n_jobs) to one per GPU")
        log.warning("%s", warnings[-1])
    else:
        source = f"free slot {slot} of {n} ({slot_dir()})"
    torch.cuda.set_device(slot)
    record = {"index": slot, "visible": n, "device": f"cuda:{slot}", "name": gpu_names(n)[slot],
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "source": source}
    log.info("gpu: job runs on cuda:%d (%s)", slot, source)
    return record, warnings


def apply(model_cfg) -> tuple[dict | None, list[str]]:
    """`assign` for the running Hydra job (launcher and job number from `HydraConfig`; a single run:
    nothing assigned). Call it before anything touches CUDA."""
    from hydra.core.hydra_config import HydraConfig

    from lp.threads import hydra_launcher

    launcher = hydra_launcher()
    num = HydraConfig.get().job.num if launcher is not None else 0
    return assign(model_cfg.get("device"), model_cfg.get("device_map"), launcher, num or 0)
