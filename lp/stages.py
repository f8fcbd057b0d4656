"""Wall time and peak memory per pipeline stage (`Stages`), for result.json's `timing` and `memory`."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from lp import memory

log = logging.getLogger(__name__)


class Stages:
    """Wall time (seconds) and peak memory (`lp.memory.StageMemory`: peak RSS, peak GPU memory per
    device, in MB) per pipeline stage; a stage entered twice keeps the sum of times and the max peaks."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.memory: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        log.info("[%s] ...", name)
        mem = memory.StageMemory()
        mem.start()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - t, 3)
            self.memory[name] = _max_merge(self.memory.get(name, {}), mem.stop())

    def total(self) -> dict:
        return {**self.times, "total": round(time.perf_counter() - self.t0, 3)}


def _max_merge(a: dict, b: dict) -> dict:
    """Element-wise max of two nested dicts of numbers (None and missing entries ignored)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = _max_merge(out.get(k) or {}, v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(out.get(k), (int, float)):
            out[k] = max(out[k], v)
        else:
            out[k] = v if v is not None else out.get(k)
    return out
