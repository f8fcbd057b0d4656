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
the same batches. The cache at most halves the layer calls (a step costs ~L'^2/2 instead of
~L'^2 for L' kept layers) and every candidate still runs the LM head and cross-entropy once:
on SmolLM2 (8 x 512, n = 5) 1854 vs 3520 layer calls, but only 1.36x less CPU time, as its head costs
~12 layers (`benchmarks/bench_sleb.py`). With `disk_cache: true` the steps are stored (see `ScoreCache`) and a later run
with the same model and calibration reuses its first n steps and continues from there, so a sweep
over n costs one run of the largest n. The paper calibrates on 128 x 2048 WikiText-2 train windows (`calib=wikitext2`);
that is ~L^2/2 suffix layer-passes over 128 windows per step, so use `calib=quick` on a CPU.
"""

from __future__ import annotations

import time

from lp.models import Decoder
from lp.pruners._suffix import SuffixPruner, score_removals
from lp.pruners.base import PruneContext, ScoreCache, Selection, check_n, per_layer
from lp.replay import Replay


class SLEBPruner(SuffixPruner):
    name = "sleb"

    def check(self, num_layers: int) -> None:
        check_n(self.name, self.n, num_layers - 2,
                f"SLEB never removes the first and last of the model's {num_layers} layers")

    def select(self, ctx: PruneContext) -> Selection:
        L = Decoder(ctx.model).num_layers
        self.check(L)
        disk = ScoreCache(ctx, self.name, self.disk_cache)
        steps = (disk.load() or {}).get("steps", [])[: self.n]  # greedy: the first n steps of any longer run
        reused, runner, prefix, seconds = len(steps), None, None, 0.0
        if reused < self.n:
            windows = ctx.windows  # built (tokenized) before the clock starts
            t0 = time.perf_counter()
            runner = Replay(ctx.model, windows, ctx.batch_size)
            prefix = self._greedy(runner, L, steps, ctx.progress)
            seconds = time.perf_counter() - t0
            disk.save({"steps": steps})
        order = [s["removed"] for s in steps]
        info = {
            "scores": {"kind": "calib_nll_without_layer", "values": steps[0]["nll"]},
            "order": order,
            "steps": steps,
            "calib_nll_after": steps[-1]["nll"][order[-1]],
            **self.cost(runner, prefix, seconds),
            "disk_cache": disk.info(reused_steps=reused),
        }
        return Selection(order, info)

    def _greedy(self, runner: Replay, L: int, steps: list[dict], progress: bool = False):
        """Append steps len(steps)+1..n to `steps`, from the model without the layers they removed.
        Returns the prefix cache used (None with `cache: false`)."""
        kept = [i for i in range(L) if i not in {s["removed"] for s in steps}]
        prefix, h0 = self.start(runner, kept)
        while len(steps) < self.n:
            cands = [i for i in kept if 0 < i < L - 1]
            scores = score_removals(runner, kept, cands, prefix, h0, progress,
                                    f"sleb step {len(steps) + 1}/{self.n}")
            best = min(cands, key=lambda i: (scores[i], i))
            steps.append({"removed": best, "nll": per_layer(scores, L)})
            if prefix is not None:
                prefix.remove(kept.index(best))
            kept.remove(best)
        return prefix
