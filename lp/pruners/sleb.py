"""`pruner=sleb`: SLEB, greedy iterative block removal by calibration NLL.

Song et al., "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks", ICML 2024. With M_K the model made of the kept dense layers K (initially
0..L-1) and calibration windows x_1..x_N of T tokens,

    NLL(K) = 1/N sum_w 1/(T-1) sum_t -log p_{M_K}(x_w[t+1] | x_w[<=t]),
    step s:  l_s = argmin_{l in K, 0 < l < L-1} NLL(K \\ {l}),   K <- K \\ {l_s},

repeated n times: every remaining candidate is re-scored on the current (already pruned) model
after each removal. The first (0) and last (L-1) dense layers are never removed, so
1 <= n <= L-2. Ties go to the lower index. Layer indices are dense (0..L-1).

Cost: step s scores L-2-s candidates. With `cache: true` the hidden state entering every
position is kept (see `lp.pruners._suffix`), so a candidate at position p runs only the layers
after it (plus norm, LM head, cross-entropy); after a removal at position p only positions > p
are recomputed. `cache_gb` bounds that memory: N*T*D*bytes per position (SmolLM2, 128 x 2048
bf16: 151 MB; Llama-2-7B: 2.1 GB); positions beyond the budget are recomputed by walking forward
through one extra buffer. `cache: false` re-runs every remaining layer for every candidate
(the naive re-scoring, kept for comparison). Both give the same scores: the same layers run on
the same batches. The paper calibrates on 128 x 2048 WikiText-2 train windows (`calib=wikitext2`);
that is ~L^2/2 suffix layer-passes over 128 windows per step, so use `calib=quick` on a CPU.
"""

from __future__ import annotations

import time

from lp.models import Decoder
from lp.pruners._suffix import LayerRunner, PrefixCache, check_cache_gb, check_n, per_layer, score_removals
from lp.pruners.base import PruneContext, Selection


class SLEBPruner:
    name = "sleb"
    needs_calibration = True

    def __init__(self, n: int = 5, cache: bool = True, cache_gb: float = 4.0):
        self.n = n
        self.cache = bool(cache)
        self.cache_gb = check_cache_gb(self.name, cache_gb)

    def check(self, num_layers: int) -> None:
        check_n(self.name, self.n, num_layers - 2,
                f"SLEB never removes the first and last of the model's {num_layers} layers")

    def select(self, ctx: PruneContext) -> Selection:
        L = Decoder(ctx.model).num_layers
        self.check(L)
        windows = ctx.windows  # built (tokenized) before the clock starts
        t0 = time.perf_counter()
        runner = LayerRunner(ctx.model, windows, ctx.batch_size)
        kept = list(range(L))
        if self.cache:
            prefix, h0 = PrefixCache(runner, kept, self.cache_gb * 2**30), None
        else:
            prefix, h0 = None, runner.embed()
        order, steps = [], []
        for _ in range(self.n):
            cands = [i for i in kept if 0 < i < L - 1]
            scores = score_removals(runner, kept, cands, prefix, h0)
            best = min(cands, key=lambda i: (scores[i], i))
            order.append(best)
            steps.append({"removed": best, "nll": per_layer(scores, L)})
            if prefix is not None:
                prefix.remove(kept.index(best))
            kept.remove(best)
        info = {
            "scores": {"kind": "calib_nll_without_layer", "values": steps[0]["nll"]},
            "order": order,
            "steps": steps,
            "calib_nll_after": scores[best],
            "layer_calls": runner.layer_calls,
            "head_calls": runner.head_calls,
            "cache": prefix.info(self.cache_gb) if prefix else {"enabled": False},
            "time_s": round(time.perf_counter() - t0, 3),
        }
        return Selection(order, info)
