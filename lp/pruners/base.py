"""What every pruner shares: the `Pruner` protocol, the `Selection` it returns, the `PruneContext` it
reads from, the base classes (`StatsPruner`, `block_selection`), the settings checks and the on-disk
`ScoreCache`. Layer indices are dense (0..L-1); h_l = residual stream entering dense layer l,
h_L = last layer output before the final norm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lp import cache
from lp import hadamard as hd
from lp.calib import Calibration, check_block
from lp.devices import input_device, model_dtype

log = logging.getLogger(__name__)
SCORES_VERSION = 2  # bump when stored pruner scores (or the entry format) change (invalidates the disk cache)


@dataclass
class Selection:
    """Layers to remove (dense indices, sorted) plus method-specific report data for result.json
    (e.g. `scores`: per-layer or per-candidate curve, `order`: removal order of iterative methods).
    A width pruner (`lp.methods`) removes no layer and hands its plan in `width` instead: data (what
    to cut), not a flag; the run applies it at the drop."""

    removed: list[int]
    info: dict = field(default_factory=dict)
    width: object | None = None  # a `lp.width.WidthPlan` (width pruners; removed == [])

    def __post_init__(self):
        self.removed = sorted(int(i) for i in self.removed)


@dataclass(frozen=True)
class PruneContext:
    """What a pruner (and the patch fitting) may use; fixed once built (`lp.run.prune_context`).

    `model` is the dense model (eval mode); `calibration` the run's `lp.calib.Calibration`, the one owner
    of the calibration windows (built on first use), the statistics computed from them (`lp.calib.get_stats`)
    and their provenance; `batch_size` the resolved calibration batch size.
    """

    model: nn.Module
    tokenizer: object
    calibration: Calibration
    cache_key: dict = field(default_factory=dict)  # model/data/sampler identity for on-disk caches
    batch_size: int = 1
    basis: hd.Basis = hd.Basis()  # of the rotated statistics (and their stand-in where the basis has no matrix)
    progress: bool = False  # tqdm bars for calibration and layer re-scoring (`lp.progress`)

    @property
    def windows(self) -> torch.Tensor:
        """The calibration windows [N, T] int64 (`calibration.windows`: built on first read)."""
        return self.calibration.windows


@runtime_checkable
class Pruner(Protocol):
    """A layer-selection method, built by Hydra from `conf/pruner/<name>.yaml`.

    `name`: the conf file's name (= `pruning.method` in result.json), the key of its entry in
    `lp.methods` (display label; whether it prunes width), which pruners do not repeat; `n`: how many
    layers it removes (0 for `none`); `needs_calibration`: whether `select` reads calibration windows
    (so the corpus is checked before any weights load). `check(num_layers)` validates the settings
    against the dense layer count before loading; `select(ctx)` chooses the layers to remove.
    """

    name: str
    n: int
    needs_calibration: bool

    def check(self, num_layers: int) -> None: ...

    def select(self, ctx: PruneContext) -> Selection: ...


# --------------------------------------------------------------------------- one-shot statistics pruners
def nan_to_none(values) -> list:
    return [None if v != v else float(v) for v in values.tolist()]


MAX_ALTERNATIVES = 16  # runner-up selections offered to the held-out check / pruner.rerank


def block_selection(method: str, scores, n: int, kind: str, lower_is_better: bool = False, **extra) -> Selection:
    """Pick the best start from a per-start curve `scores` [L-n+1] (NaN = not a candidate);
    `alternatives` = the next blocks by the same score, best first (for `lp.verify.check_selection`)."""
    if torch.isinf(scores).any() or torch.isnan(scores).all():
        raise ValueError(f"{method}: block scores are not finite ({nan_to_none(scores)}): the model's activations "
                         "or the statistics are broken (NaN/inf), so no ranking can be trusted")
    masked = scores.nan_to_num(float("inf") if lower_is_better else float("-inf"))
    order = torch.argsort(masked, descending=not lower_is_better, stable=True)
    order = [int(i) for i in order if not torch.isnan(scores[i])]
    start = order[0]
    return Selection(list(range(start, start + n)), {
        "block": [start, start + n], "scores": {"kind": kind, "values": nan_to_none(scores)},
        "alternatives": [list(range(i, i + n)) for i in order[1:1 + MAX_ALTERNATIVES]], **extra})


def check_rerank(name: str, rerank) -> int:
    """`pruner.rerank`: 0 (off) or k >= 2: pick among the top k selections by held-out NLL (`lp.verify`)."""
    if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0 or rerank == 1 \
            or rerank > MAX_ALTERNATIVES + 1:
        raise ValueError(f"pruner={name}: pruner.rerank={rerank!r} must be 0 (off) or an integer "
                         f"2..{MAX_ALTERNATIVES + 1} (pick among the top k by held-out NLL)")
    return rerank


class StatsPruner:
    """Base of the one-shot pruners that remove `n` layers chosen from the shared `lp.calib.CalibStats`."""

    name = ""
    needs_calibration = True

    def __init__(self, n: int = 5, rerank: int = 0):
        self.n = n
        self.rerank = check_rerank(self.name, rerank)

    def check(self, num_layers: int) -> None:
        check_block(f"pruner={self.name}", self.n, num_layers)


# --------------------------------------------------------------------------- settings
def check_n(name: str, n, max_n: int, constraint: str) -> int:
    """Validate `pruner.n` against `1 <= n <= max_n`; the error names the method's constraint."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"pruner={name}: pruner.n={n!r} must be an integer")
    if not 1 <= n <= max_n:
        raise ValueError(f"pruner={name}: pruner.n={n} out of range: {constraint}, so 1 <= n <= {max_n}")
    return n


def check_flag(name: str, key: str, value) -> bool:
    """A true/false setting: anything but a bool (e.g. the string "no") is an error, not truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"pruner={name}: pruner.{key}={value!r} must be true or false")
    return value


def check_cache_gb(name: str, cache_gb) -> float:
    if isinstance(cache_gb, bool) or not isinstance(cache_gb, (int, float)) or cache_gb < 0:
        raise ValueError(f"pruner={name}: pruner.cache_gb={cache_gb!r} must be a number >= 0 (GiB)")
    return float(cache_gb)


def per_layer(values: dict[int, float], num_layers: int) -> list[float | None]:
    """Dense per-layer list from `{layer: value}`, None where a layer has no value."""
    return [values.get(i) for i in range(num_layers)]


# --------------------------------------------------------------------------- disk cache
class ScoreCache:
    """A pruner's scores for one model + calibration set: the `lp.cache` entry
    `<lp cache>/select/<method>-<digest>/value.json`.

    So a sweep over n scores once: `ppl`/`taylor` scores do not depend on n, and SLEB's greedy steps
    for n are the first n steps for any larger n. Key = `ctx.cache_key` (model config, data source,
    calibration settings) + method + `settings` that change the values + batch size, device type,
    dtype and `SCORES_VERSION` (kept in the entry's manifest; an entry with another key is rebuilt).
    It also records the calibration provenance, which `load` hands to `ctx.calibration.served_from_cache`.
    Disabled (`path` None) when `enabled` is false or `ctx.cache_key` is empty (tests, benchmarks).
    Reading and writing happen only in `load` / `save`.
    """

    def __init__(self, ctx, method: str, enabled: bool = True, **settings):
        self.ctx = ctx
        self.key = cache.normal_key({
            "ctx": ctx.cache_key, "method": method, "settings": settings, "batch_size": ctx.batch_size,
            "device": input_device(ctx.model).type, "dtype": str(model_dtype(ctx.model)), "version": SCORES_VERSION,
        })
        self.name = f"{method}-{cache.digest(self.key)}"
        self.path = cache.root() / "select" / self.name if enabled and ctx.cache_key else None

    def load(self) -> dict | None:
        if self.path is None:
            return None
        entry = cache.read("select", self.key, _read_scores, name=self.name)
        if entry is None:
            return None
        self.ctx.calibration.served_from_cache(entry.get("calibration"))
        return entry["value"]

    def save(self, value: dict) -> None:
        if self.path is None:
            return
        entry = {"calibration": self.ctx.calibration.windows_provenance, "value": value}
        cache.store("select", self.key, lambda tmp: (tmp / "value.json").write_text(json.dumps(entry, default=str)),
                    name=self.name)

    def info(self, **extra) -> dict:
        return {"path": str(self.path) if self.path else None, **extra}


def _read_scores(path: Path) -> dict:
    entry = json.loads((path / "value.json").read_text())
    if not isinstance(entry, dict) or "value" not in entry:
        raise ValueError("value.json holds no scores")
    return entry
