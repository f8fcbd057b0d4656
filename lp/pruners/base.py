"""The pruner protocol, the selection it returns and the context it reads from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
from torch import nn


@dataclass
class Selection:
    """Layers to remove (dense indices, sorted) plus method-specific report data for result.json
    (e.g. `scores`: per-layer or per-candidate curve, `order`: removal order of iterative methods)."""

    removed: list[int]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.removed = sorted(int(i) for i in self.removed)


@dataclass
class PruneContext:
    """What a pruner may use. Calibration windows are built lazily on first access.

    `model` is the dense model (eval mode); `calib_fn()` returns `(windows [N, T] int64, provenance)`.
    """

    model: nn.Module
    tokenizer: object
    calib_fn: Callable[[], tuple[torch.Tensor, dict]]
    cache_key: dict = field(default_factory=dict)  # model/data/sampler identity for on-disk caches
    batch_size: int = 1
    hadamard_fallback_seed: int | None = None  # rotation of the shared statistics where no Hadamard exists
    cached_provenance: dict | None = None  # set by a disk cache whose entry served this run instead

    @property
    def provenance(self) -> dict | None:
        """Where this run's calibration windows came from: built now, or recorded with a cache entry."""
        return self.calib_provenance if self.calib_used else self.cached_provenance

    @cached_property
    def _calib(self):
        return self.calib_fn()

    @property
    def windows(self) -> torch.Tensor:
        return self._calib[0]

    @property
    def calib_provenance(self) -> dict:
        return self._calib[1]

    @property
    def calib_used(self) -> bool:
        return "_calib" in self.__dict__


class Pruner(Protocol):
    name: str

    def check(self, num_layers: int) -> None: ...

    def select(self, ctx: PruneContext) -> Selection: ...
