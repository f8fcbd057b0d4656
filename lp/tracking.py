"""Experiment trackers: a tiny metric-logger protocol with ``none`` and ``wandb`` back-ends.

Selected with Hydra (``tracker=none`` / ``tracker=wandb``) and built with ``hydra.utils.instantiate``,
passing the job dir and the resolved config at run time::

    tracker = instantiate(cfg.tracker, dir=job_dir, config=OmegaConf.to_container(cfg, resolve=True))
    log_result(tracker, result)
    tracker.finish(result["status"])

``WandbTracker(mode="auto")`` goes online only when an API key is configured *and* the server
answers within ``probe_timeout`` seconds; otherwise it logs offline under ``<dir>/wandb/`` and warns
how to upload later (``wandb sync <run dir>``).
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

log = logging.getLogger(__name__)
DEFAULT_BASE_URL = "https://api.wandb.ai"
MODES = ("online", "offline", "disabled")


@runtime_checkable
class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None: ...

    def log_html(self, name: str, html: str) -> None: ...

    def summary(self, values: dict) -> None: ...

    def finish(self, status: str = "ok") -> None: ...


class NoneTracker:
    """``tracker=none``: accepts (and ignores) the same keyword args as the other trackers."""

    def __init__(self, **_: Any) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def log_html(self, name: str, html: str) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, status: str = "ok") -> None:
        pass


def api_key_configured(base_url: str | None = None) -> bool:
    """``WANDB_API_KEY`` is set or the netrc (``$NETRC`` or ``~/.netrc``) has a password for the host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def server_reachable(base_url: str | None = None, timeout: float = 2.0) -> bool:
    """TCP connect to the wandb server; DNS included, bounded by ``timeout`` seconds overall."""
    url = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except (OSError, TypeError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def resolve_mode(mode: str = "auto", base_url: str | None = None, timeout: float = 2.0) -> tuple[str, str]:
    """Map ``auto`` to ``online``/``offline``; returns (mode, reason)."""
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"wandb mode must be auto|{'|'.join(MODES)}, got {mode!r}")
        return mode, "requested"
    url = base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    if not api_key_configured(url):
        return "offline", "no API key (WANDB_API_KEY or netrc)"
    if not server_reachable(url, timeout):
        return "offline", f"{url} not reachable within {timeout:g}s"
    return "online", "API key set and server reachable"


def _plain(config) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    try:
        from omegaconf import OmegaConf
        return OmegaConf.to_container(config, resolve=True)
    except Exception:
        return dict(config)


class WandbTracker:
    """Weights & Biases back-end. Files go to ``<dir>/wandb/`` (``dir`` defaults to the cwd, which is
    the job dir under Hydra). ``mode``: auto | online | offline | disabled."""

    def __init__(self, project: str, entity: str | None = None, group: str | None = None,
                 job_type: str | None = None, name: str | None = None, mode: str = "auto",
                 dir: str | os.PathLike | None = None, config: Any = None, tags: list[str] | None = None,
                 probe_timeout: float = 2.0) -> None:
        import wandb

        self._wandb, self._finished = wandb, False
        self.dir = Path(dir or os.getcwd())
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode, reason = resolve_mode(mode, timeout=probe_timeout)
        kwargs = dict(project=project, entity=entity, group=group, job_type=job_type, name=name,
                      dir=str(self.dir), config=_plain(config), tags=list(tags) if tags else None,
                      reinit="finish_previous")
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - any online failure: keep the results locally
            if self.mode != "online":
                raise
            self.mode, reason = "offline", f"online init failed: {type(e).__name__}: {e}"
            self.run = wandb.init(mode=self.mode, **kwargs)
        if self.mode == "offline":
            run_dir = getattr(self.run.settings, "sync_dir", None) or self.dir / "wandb"
            log.warning("wandb is OFFLINE (%s): run saved in %s -- upload later with `wandb sync %s`",
                        reason, run_dir, run_dir)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_html(self, name: str, html: str) -> None:
        self.run.log({name: self._wandb.Html(html, inject=False)})

    def summary(self, values: dict) -> None:
        self.run.summary.update(dict(values))

    def finish(self, status: str = "ok") -> None:
        if not self._finished:
            self._finished = True
            self.run.finish(exit_code=0 if status == "ok" else 1)

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.finish("ok" if exc_type is None else "failed")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_result(tracker: Tracker, result: dict) -> None:
    """Log a result.json dict: metrics (+ pruning/timing scalars) as summary, and as tables the
    ``pruning.scores.values`` curve (index, score) and the per-cut patch scale statistics."""
    pruning, patch = result.get("pruning") or {}, result.get("patch") or {}
    summary = {k: v for k, v in (result.get("metrics") or {}).items() if _number(v)}
    summary |= {f"pruning/{k}": v for k, v in pruning.items() if _number(v)}
    summary |= {f"timing/{k}": v for k, v in (result.get("timing") or {}).items() if _number(v)}
    summary["status"] = result.get("status", "ok")
    if pruning.get("removed_layers") is not None:
        summary["pruning/removed_layers"] = " ".join(map(str, pruning["removed_layers"]))
    if result.get("error"):
        summary["error"] = str(result["error"])[:2000]
    if result.get("warnings"):
        summary["warnings"] = "; ".join(map(str, result["warnings"]))[:2000]
    if result.get("resumed_from"):
        summary["resumed_from"] = str(result["resumed_from"])
    tracker.summary(summary)
    scores = (pruning.get("scores") or {}).get("values")
    if scores:
        tracker.log_table("pruning/scores", ["index", "score"],
                          [[i, float(s) if _number(s) else None] for i, s in enumerate(scores)])
    cuts = patch.get("cuts") or []
    if cuts:
        cols, rows = cut_table(cuts)
        tracker.log_table("patch/cuts", cols, rows)


def cut_table(cuts: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, rows) of ``result["patch"]["cuts"]``: ``cut`` (its index) and the fields of
    `lp.patch.CutRecord`, in its order (lists such as ``massive_channels`` joined with spaces)."""
    from lp.patch import CUT_FIELDS  # noqa: PLC0415 - torch only when there are cuts to log

    def cell(v):
        return " ".join(map(str, v)) if isinstance(v, list) else v

    return ["cut", *CUT_FIELDS], [[i, *(cell(c.get(k)) for k in CUT_FIELDS)] for i, c in enumerate(cuts)]


def sweep_group(sweep_name: str | None, sweep_dir) -> str | None:
    """W&B group of a sweep's runs: ``<sweep name>/<sweep dir name>`` (the timestamp folder), so each
    run of a sweep is its own group; None outside a sweep."""
    return f"{sweep_name}/{Path(sweep_dir).name}" if sweep_name and sweep_dir else None


# ------------------------------------------------------------------------- run lifecycle
def start_tracker(cfg, out: Path, result: dict, job_type: str) -> Tracker:
    """`cfg.tracker` built with `dir=out` and the resolved config. Null `group` / `job_type` / `name`
    keys of the tracker config (wandb) become `<sweep name>/<sweep timestamp dir>` (multirun only, else
    null; see `lp.tracking.sweep_group`), `job_type`
    (the pruner) and the run's name (e.g. `smollm2_135m/shortgpt/rotate/n4`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    multirun = HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    group = sweep_group(cfg.get("sweep_name"), HydraConfig.get().sweep.dir) if multirun else None
    fill = {"group": group, "job_type": job_type, "name": result["name"]}
    fill = {k: v for k, v in fill.items() if k in cfg.tracker and cfg.tracker[k] is None}
    # partial, then called: `config` cannot go through instantiate (its own first parameter; and
    # instantiate would build the `_target_` nodes inside the resolved config)
    return instantiate(cfg.tracker, _partial_=True, _convert_="all", **fill)(dir=str(out), config=result["config"])


def log_finished(cfg, out: Path, result: dict) -> None:
    """Log an already finished result (a job skipped by resume: its copied result.json) to
    `cfg.tracker` as a run of its own, so a resumed sweep's group still holds every job."""
    try:
        tracker = start_tracker(cfg, out, result, job_type=(result.get("pruning") or {}).get("method") or "run")
    except Exception:  # noqa: BLE001 - the result is safe on disk; the tracker is a copy of it
        log.warning("tracker: could not log the resumed result", exc_info=True)
        return
    finish_tracker(tracker, result)


def finish_tracker(tracker, result: dict) -> None:
    """`log_result` then `finish(status)`; a tracker error is logged and never masks the run's outcome."""
    try:
        log_result(tracker, result)
    except Exception:  # noqa: BLE001
        log.warning("tracker: logging the result failed", exc_info=True)
    try:
        tracker.finish(result["status"])
    except Exception:  # noqa: BLE001
        log.warning("tracker: finish failed", exc_info=True)
