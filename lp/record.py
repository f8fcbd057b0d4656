"""What a run records about itself besides its results: the library versions and git commit of the
checkout (`environment`), the Hydra choices and overrides of the running job (`hydra_runtime`), and
the one way lp writes a JSON record (`write_json_atomic`: result.json of runs, lost jobs and sweeps)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import hydra
import torch
import transformers
from hydra.core.hydra_config import HydraConfig


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as JSON to `path` via a temporary file and `os.replace` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def environment() -> dict:
    """Library versions and the git commit (and dirty flag) of the lp checkout, for result.json."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "hydra": hydra.__version__}
    try:
        versions["lm_eval"] = importlib.metadata.version("lm_eval")  # without importing lm-eval (slow)
    except importlib.metadata.PackageNotFoundError:
        pass
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"versions": versions, "git_commit": commit, "git_dirty": dirty}


def hydra_runtime() -> tuple[dict, list[str]]:
    """(group -> chosen option, task overrides) of the running Hydra job; empty outside Hydra."""
    if not HydraConfig.initialized():
        return {}, []
    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    return choices, list(hc.overrides.task)
