"""`batch_size: auto` for calibration, perplexity and the teacher's top-k logits: the largest batch that fits.

On a GPU, accelerate's `find_executable_batch_size` runs a probe (one real batch of the stage's own
work) from `start` windows, halving on CUDA out-of-memory until it runs; the size is found once per
stage and recorded in result.json. On the CPU there is no out-of-memory signal to search with (the
process would swap or be killed), so `auto` is 1, the size every CPU figure in this project was
measured at. Batching does not change the numbers beyond float rounding: every window is scored on
its own (no padding, equal lengths), and the calibration sums are sums over windows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

AUTO_START = 64  # the first size tried on a GPU (capped by the number of windows)


def is_auto(value) -> bool:
    return value == "auto"


def resolve(value, device: torch.device, probe: Callable[[int], object], windows: int, what: str) -> int:
    """`value` (an integer, or "auto") as a batch size for `windows` windows on `device`; for "auto" on a
    GPU, the largest size <= min(AUTO_START, windows) (halving) for which `probe(size)` runs."""
    if not is_auto(value):
        return int(value)
    if device.type != "cuda":
        return 1
    from accelerate.utils import find_executable_batch_size

    size = {"now": max(1, min(AUTO_START, windows))}

    def halve() -> int:
        size["now"] //= 2
        return size["now"]

    @find_executable_batch_size(starting_batch_size=size["now"], reduce_batch_size_fn=halve)
    def largest(batch_size: int) -> int:
        probe(batch_size)
        return batch_size

    found = largest()
    log.info("%s batch_size=auto: %d on %s", what, found, device)
    return found
