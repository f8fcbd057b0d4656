"""`pruner=shortgpt`: ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect", 2024).

Block Influence of dense layer l (l = 0..L-1), from its input h_l and output h_{l+1}:
    BI_l = 1 - mean over calibration tokens of cos(h_l[t], h_{l+1}[t])  (cosine over hidden)
Remove the n layers with the lowest BI, one shot (ties: lower index first); they need not be
contiguous, so LinearPatch then places one patch per contiguous run. Reads the shared one-pass
`lp.calib.CalibStats`.
"""

import torch

from lp.calib import get_stats
from lp.pruners.base import MAX_ALTERNATIVES, PruneContext, Selection, StatsPruner


class ShortGPTPruner(StatsPruner):
    name = "shortgpt"

    def select(self, ctx: PruneContext) -> Selection:
        stats = get_stats(ctx)
        L = stats.num_layers
        idx = torch.arange(L)
        bi = 1 - stats.cos_token[idx, idx + 1]
        ranked = torch.argsort(bi, stable=True).tolist()
        order = ranked[: self.n]
        # runner-ups by the same score: the n-th lowest BI swapped for the next ones
        alternatives = [order[:-1] + [i] for i in ranked[self.n:self.n + MAX_ALTERNATIVES]]
        return Selection(order, {"order": order, "scores": {"kind": "block_influence", "values": bi.tolist()},
                                 "alternatives": alternatives, "calibration": stats.cost})
