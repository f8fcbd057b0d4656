"""Paired differences of per-window held-out NLL with their standard errors: the statistics every
verification decision uses (`lp.verify`: kind vs none, kind vs kind, selection vs runner-up).

The units are windows (drawn independently); tokens inside one window are not independent, so token
blocks would understate the SE. A difference is significant when |mean| >= `SIGNIFICANCE` standard errors.
"""

from __future__ import annotations

import math

import torch

SIGNIFICANCE = 2.0  # a paired mean difference is significant when |mean| >= 2 standard errors
RULE = f"paired over held-out windows; significant: |diff| >= {SIGNIFICANCE:g} SE (SE = sd/sqrt(n))"


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The paired difference `a - b` of two per-window NLL vectors `[n]` (same windows):
    `{"diff": mean, "se": sd/sqrt(n) (None for n < 2), "n", "z": diff/se (None when se is 0 or
    undefined), "significant": |diff| >= SIGNIFICANCE * se}`. With n < 2 nothing is significant."""
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired() needs two per-window vectors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.double() - b.double()
    n = d.numel()
    diff = d.mean().item()
    se = (d.std(unbiased=True) / math.sqrt(n)).item() if n >= 2 else None
    z = diff / se if se else None
    significant = se is not None and diff != 0 and abs(diff) >= SIGNIFICANCE * se
    return {"diff": diff, "se": se, "n": n, "z": z, "significant": significant}


def beyond(cmp: dict, margin: float) -> bool:
    """`a` is worse than `b` (`cmp = paired(a, b)`) by more than `margin` nats, significantly."""
    return cmp["significant"] and cmp["diff"] > margin


def better(cmp: dict) -> bool:
    """`a` is significantly better (lower NLL) than `b` (`cmp = paired(a, b)`)."""
    return cmp["significant"] and cmp["diff"] < 0


def describe(cmp: dict) -> str:
    """`+0.0860 ± 0.0120 nats (SE, n=8 windows, 7.2 SE)`: a difference as printed in warnings."""
    se = "n/a" if cmp["se"] is None else f"{cmp['se']:.4f}"
    z = "" if cmp["z"] is None else f", {abs(cmp['z']):.1f} SE"
    return f"{cmp['diff']:+.4f} ± {se} nats (SE, n={cmp['n']} windows{z})"


def flip(cmp: dict) -> dict:
    """`paired(b, a)` from `paired(a, b)`."""
    return {**cmp, "diff": -cmp["diff"], "z": None if cmp["z"] is None else -cmp["z"]}
