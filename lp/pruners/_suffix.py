"""Calibration NLL of a model with layers removed, from cached hidden states (`sleb`, `ppl`).

Conventions (see `lp.replay`, the layer-replay engine this builds on): dense layers 0..L-1;
`kept` is the ordered list of dense indices still in the model and a *position* p indexes `kept`;
H_p = residual stream entering `kept[p]` for every calibration window, a `[N, T, D]` tensor in the
model dtype (H_0 = the embedding output).

Removing the layer at position p leaves H_0..H_p unchanged (a layer's removal cannot change what
enters it), so the model without `kept[p]` has NLL `Replay.nll(H_p, kept[p+1:]).mean()`: only the
layers after p, the final norm and the LM head run. `lp.replay.StreamCache` keeps H_p for as many leading
positions as a memory budget allows and walks forward from the last stored one otherwise.
"""

from __future__ import annotations

from torch import Tensor

from lp.progress import bar
from lp.pruners.base import check_cache_gb, check_flag
from lp.replay import Replay, StreamCache


def score_removals(runner: Replay, kept: list[int], candidates, prefix: StreamCache | None,
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
    needs_calibration = True

    def __init__(self, n: int = 5, cache: bool = True, cache_gb: float = 4.0, disk_cache: bool = True):
        self.n = n
        self.cache = check_flag(self.name, "cache", cache)
        self.cache_gb = check_cache_gb(self.name, cache_gb)
        self.disk_cache = check_flag(self.name, "disk_cache", disk_cache)

    def start(self, runner: Replay, kept: list[int]) -> tuple[StreamCache | None, Tensor | None]:
        """`(prefix, h0)` for `score_removals`: a prefix cache, or (`cache: false`) the embedding output."""
        if self.cache:
            return StreamCache(runner, kept, self.cache_gb * 2**30), None
        return None, runner.embed()

    def cost(self, runner: Replay | None, prefix: StreamCache | None, seconds: float) -> dict:
        """Calls, cache settings and time for result.json (`runner` None: everything came from disk)."""
        if runner is None:
            cache = {"enabled": self.cache, "used": False}
        else:
            cache = prefix.info(self.cache_gb) if prefix else {"enabled": False}
        return {"layer_calls": runner.layer_calls if runner else 0, "head_calls": runner.head_calls if runner else 0,
                "cache": cache, "time_s": round(seconds, 3)}
