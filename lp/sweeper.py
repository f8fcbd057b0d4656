"""The sweeper: Hydra's basic grid sweeper plus one dense job per (model, evaluation settings).

Every table block needs the Dense reference of the same model evaluated the same way (RP comes from
it). So for each pruned job of the grid, :func:`dense_job` derives its dense twin -- the same
overrides without the pruner/patch/distill/calibration/seed ones, plus ``pruner=none patch=none
distill=none`` -- and the sweeper runs each distinct twin once, before the grid (job 0, 1, ...).
A grid that already holds that dense job (``pruner=none,...``) gets no second one. A dense job
that finished in an earlier run of the same sweep is reused by the usual resume (same config
hash). ``hydra.sweeper.dense=false`` turns it off.

The Hydra plugin class is :class:`hydra_plugins.lp_sweeper.DenseFirstSweeper` (Hydra loads plugins
only from the ``hydra_plugins`` package), selected by ``conf/hydra/sweeper/dense_first.yaml``;
it works with any launcher.
"""

from __future__ import annotations

import logging

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from lp.methods import prunes_width

log = logging.getLogger(__name__)

# Override keys a dense job does not depend on (dropped from its twin): the pruning, the patch, its
# distillation, the calibration that served them, and seeds (dense evaluation is deterministic).
PRUNING_KEYS = ("pruner", "patch", "distill", "calib")
DENSE = ["pruner=none", "patch=none", "distill=none"]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _dropped(key: str) -> bool:
    return key.split(".")[0] in PRUNING_KEYS or key == "seed" or key.endswith("_seed")


def dense_job(job: list[str]) -> list[str]:
    """The overrides of ``job``'s dense twin (see the module doc)."""
    return [o for o in job if not _dropped(_key(o))] + DENSE


def is_dense_job(job: list[str], default_pruner: str | None) -> bool:
    pruner = next((o.partition("=")[2] for o in job if _key(o) == "pruner"), default_pruner)
    return pruner in (None, "none")


def without_width_patches(jobs: list[list[str]]) -> list[list[str]]:
    """``jobs`` minus those that pair a width pruner (:mod:`lp.methods`: heads/channels instead of layers,
    so a patch has no cut to bridge) with a patch other than none (rejected by the run), e.g. the
    LLM-Pruner rows of paper_qa; logged."""
    def width_pruner(job):
        ov = dict(o.lstrip("+~").partition("=")[::2] for o in job)
        return ov.get("pruner") if prunes_width(ov.get("pruner", "")) and ov.get("patch", "none") != "none" else None

    dropped = [j for j in jobs if width_pruner(j)]
    if dropped:
        log.info("sweep: %d job(s) left out: %s prune width, patch must be none (%s)", len(dropped),
                 "/".join(dict.fromkeys(map(width_pruner, dropped))), "; ".join(" ".join(j) for j in dropped))
    return [j for j in jobs if not width_pruner(j)]


def with_dense_jobs(jobs: list[list[str]], default_pruner: str | None) -> list[list[str]]:
    """``jobs`` preceded by the distinct dense twins of its pruned jobs that it does not hold yet."""
    have = {frozenset(dense_job(j)) for j in jobs if is_dense_job(j, default_pruner)}
    extra: dict[frozenset, list[str]] = {}
    for j in jobs:
        if not is_dense_job(j, default_pruner):
            twin = dense_job(j)
            if frozenset(twin) not in have:
                extra.setdefault(frozenset(twin), twin)
    return [*extra.values(), *jobs]


def sweep_jobs(config) -> list[list[str]] | None:
    """The job overrides a multirun of the launching ``config`` makes (``hydra.sweeper.params`` + the
    command line, dense twins first when on); None for other sweepers or sweeps not expandable here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    target = OmegaConf.select(config, "hydra.sweeper._target_")
    if target not in (f"{BasicSweeper.__module__}.BasicSweeper", "hydra_plugins.lp_sweeper.DenseFirstSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        jobs = without_width_patches(BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)[0])
    except Exception:  # noqa: BLE001 - e.g. glob sweeps: the caller shows "?"
        return None
    if target.endswith("DenseFirstSweeper") and OmegaConf.select(config, "hydra.sweeper.dense", default=True):
        jobs = with_dense_jobs(jobs, OmegaConf.select(config, "hydra.runtime.choices.pruner"))
    return jobs
