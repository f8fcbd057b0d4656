"""Progress bars for the long stages that would otherwise be silent: calibration statistics and the
re-scoring pruners' layer selection (SLEB, PPL, Taylor+). One tqdm bar each, with rate and ETA, on
stderr; the PPL evaluation has its own (``eval.ppl.progress``). Switched by the top-level
``progress`` setting (``progress=false`` for quiet logs)."""

from __future__ import annotations

from collections.abc import Iterable


def bar(iterable: Iterable, on: bool, desc: str, total: int | None = None, unit: str = "it") -> Iterable:
    """``iterable`` wrapped in a tqdm bar named ``desc`` when ``on``, else unchanged."""
    if not on:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
