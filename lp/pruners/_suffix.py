"""Calibration NLL of a model with layers removed, from cached hidden states (`sleb`, `ppl`).

Conventions (see `lp.replay`, the layer-replay engine this builds on): dense layers 0..L-1;
`kept` is the ordered list of dense indices still in the model and a *position* p indexes `kept`;
H_p = residual stream entering `kept[p]` for every calibration window, a `[N, T, D]` tensor in the
model dtype (H_0 = the embedding output).

Removing the layer at position p leaves H_0..H_p unchanged (a layer's removal cannot change what
enters it), so the model without `kept[p]` has NLL `Replay.nll(H_p, kept[p+1:]).mean()`: only the
layers after p, the final norm and the LM head run. `PrefixCache` keeps H_p for as many leading
positions as a memory budget allows and walks forward from the last stored one otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lp.progress import bar
from lp.pruners.base import check_cache_gb, check_flag
from lp.replay import Replay


class PrefixCache:
    """H_p for positions p of the current `kept` list, kept up to a memory budget.

    Positions 0..m-1 are stored as they are first computed, where m = max(1, budget // bytes of
    one position) (H_0 is always stored). A position beyond the budget is recomputed by walking
    forward from the highest stored one into a single reusable buffer, so walking positions in
    increasing order costs one layer call per step either way; the tensor `get` returns stays
    valid until the next `get`. `remove(p)` drops `kept[p]`: H_0..H_p stay valid (H_p now enters
    the next layer), every stored position after p is discarded and recomputed on demand.
    Memory: min(m, len(kept)) + 1 positions of N*T*D elements at most.
    """

    def __init__(self, runner: Replay, kept: list[int], budget_bytes: float):
        self.runner = runner
        self.kept = list(kept)
        h0 = runner.embed()
        self.bytes_per_position = h0.numel() * h0.element_size()
        self.max_stored = max(1, int(budget_bytes // self.bytes_per_position))
        self.stored: dict[int, Tensor] = {0: h0}
        self._buf: Tensor | None = None
        self._buf_pos: int | None = None

    def get(self, p: int) -> Tensor:
        if not 0 <= p < len(self.kept):
            raise IndexError(f"position {p} out of range 0..{len(self.kept) - 1}")
        if p in self.stored:
            return self.stored[p]
        if self._buf_pos == p:
            return self._buf
        q = max(k for k in self.stored if k < p)
        h = self.stored[q]
        if self._buf_pos is not None and q < self._buf_pos < p:
            q, h = self._buf_pos, self._buf
        while q < p:
            if q + 1 < self.max_stored:
                out = self.stored[q + 1] = torch.empty_like(h)
            else:
                if self._buf is None:
                    self._buf = torch.empty_like(h)
                out = self._buf
            self.runner.advance(h, self.kept[q], out)
            h, q = out, q + 1
        self._buf_pos = p if h is self._buf else self._buf_pos
        return h

    def remove(self, p: int) -> None:
        """Drop the layer at position p from `kept`, invalidating the positions after it."""
        del self.kept[p]
        self.stored = {k: v for k, v in self.stored.items() if k <= p}
        if self._buf_pos is not None and self._buf_pos > p:
            self._buf_pos = None

    def info(self, budget_gb: float) -> dict:
        """Cache settings for result.json."""
        return {"enabled": True, "used": True, "budget_gb": budget_gb, "bytes_per_position": self.bytes_per_position,
                "max_positions_stored": min(self.max_stored, len(self.kept))}


def score_removals(runner: Replay, kept: list[int], candidates, prefix: PrefixCache | None,
                   h0: Tensor | None = None, progress: bool = False, desc: str = "scoring") -> dict[int, float]:
    """Calibration NLL of the model made of `kept` minus each single candidate: `{layer: nll}`.

    With `prefix` (whose `kept` must equal `kept`) each candidate at position p costs its
    suffix only, walking positions in increasing order. Without it (`cache: false`, the naive
    re-scoring) each candidate re-runs every remaining layer from the embedding output `h0`.
    `progress`: a tqdm bar `desc` over the candidates.
    """
    cands = set(candidates)
    if not cands <= set(kept):
        raise ValueError(f"candidates {sorted(cands - set(kept))} are not among the kept layers")
    scores = {}
    if prefix is None:
        if h0 is None:
            raise ValueError("score_removals without a prefix cache needs h0 (the embedding output)")
        for layer in bar([k for k in kept if k in cands], progress, desc, unit="layer"):
            scores[layer] = runner.nll(h0, [k for k in kept if k != layer]).mean().item()
        return scores
    if prefix.kept != list(kept):
        raise ValueError("prefix cache is out of sync with the kept layers")
    for p, layer in bar([(p, k) for p, k in enumerate(kept) if k in cands], progress, desc, unit="layer"):
        scores[layer] = runner.nll(prefix.get(p), kept[p + 1:]).mean().item()
    return scores


# --------------------------------------------------------------------------- pruner base
class SuffixPruner:
    """Settings and bookkeeping shared by `sleb` and `ppl`, which score removals with `score_removals`."""

    name = ""
    label = ""
    needs_calibration = True

    def __init__(self, n: int = 5, cache: bool = True, cache_gb: float = 4.0, disk_cache: bool = True):
        self.n = n
        self.cache = check_flag(self.name, "cache", cache)
        self.cache_gb = check_cache_gb(self.name, cache_gb)
        self.disk_cache = check_flag(self.name, "disk_cache", disk_cache)

    def start(self, runner: Replay, kept: list[int]) -> tuple[PrefixCache | None, Tensor | None]:
        """`(prefix, h0)` for `score_removals`: a prefix cache, or (`cache: false`) the embedding output."""
        if self.cache:
            return PrefixCache(runner, kept, self.cache_gb * 2**30), None
        return None, runner.embed()

    def cost(self, runner: Replay | None, prefix: PrefixCache | None, seconds: float) -> dict:
        """Calls, cache settings and time for result.json (`runner` None: everything came from disk)."""
        if runner is None:
            cache = {"enabled": self.cache, "used": False}
        else:
            cache = prefix.info(self.cache_gb) if prefix else {"enabled": False}
        return {"layer_calls": runner.layer_calls if runner else 0, "head_calls": runner.head_calls if runner else 0,
                "cache": cache, "time_s": round(seconds, 3)}
