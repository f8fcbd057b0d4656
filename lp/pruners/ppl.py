"""`pruner=ppl`: the one-shot perplexity criterion of Shortened LLaMA.

Kim et al., "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of
Retraining Methods" (2024), block-importance criterion "PPL": each block is removed alone and
the pruned model's perplexity on the calibration windows is its importance,

    PPL_l = exp( 1/N sum_w 1/(T-1) sum_t -log p_{M \\ l}(x_w[t+1] | x_w[<=t]) ),   l = 0..L-1,

and the n blocks with the lowest PPL_l are removed at once (no re-scoring; ties to the lower
index). Every dense layer 0..L-1 is a candidate, so 1 <= n <= L-1. Layer indices are dense.

Scoring uses the cached prefix of `lp.pruners._suffix` (`cache`, `cache_gb` as in `sleb`): one
walk over the positions, each candidate running only the layers after it. The scores do not
depend on n: with `disk_cache: true` they are stored and reused by runs with any n.
"""

from __future__ import annotations

import math
import time

from lp.models import Decoder
from lp.pruners._suffix import SuffixPruner, score_removals
from lp.pruners.base import PruneContext, ScoreCache, Selection, check_n, per_layer
from lp.replay import Replay


class PPLPruner(SuffixPruner):
    name = "ppl"

    def check(self, num_layers: int) -> None:
        check_n(self.name, self.n, num_layers - 1, f"at least one of the model's {num_layers} layers must remain")

    def select(self, ctx: PruneContext) -> Selection:
        L = Decoder(ctx.model).num_layers
        self.check(L)
        disk = ScoreCache(ctx, self.name, self.disk_cache)
        stored = disk.load()
        hit, runner, prefix, seconds = stored is not None, None, None, 0.0
        if not hit:
            windows = ctx.windows  # built (tokenized) before the clock starts
            t0 = time.perf_counter()
            runner = Replay(ctx.model, windows, ctx.batch_size)
            kept = list(range(L))
            prefix, h0 = self.start(runner, kept)
            stored = {"nll": per_layer(score_removals(runner, kept, kept, prefix, h0, ctx.progress, "ppl scoring"), L)}
            seconds = time.perf_counter() - t0
            disk.save(stored)
        ppl = {i: math.exp(v) for i, v in enumerate(stored["nll"])}
        removed = sorted(ppl, key=lambda i: (ppl[i], i))[: self.n]
        info = {
            "scores": {"kind": "calib_ppl_without_layer", "values": per_layer(ppl, L)},
            "order": removed,
            **self.cost(runner, prefix, seconds),
            "disk_cache": disk.info(hit=hit),
        }
        return Selection(removed, info)
