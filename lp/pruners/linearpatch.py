"""`pruner=linearpatch`: the LinearPatch paper's block selection (Chen et al., NeurIPS 2025).

Remove the contiguous block [i, i+n) maximising the mean over calibration tokens of
cos(h_i, h_{i+n}) (cosine over the hidden dim; h_l = stream entering dense layer l, h_L = last
layer output before the final norm). `variant`:
  * `paper`: per-token cosine over hidden, every start i = 0..L-n (as the paper's text reads);
  * `reference` (default, chosen by evidence: README "Block rule"): as the released code computes it: `torch.cosine_similarity(h_i, h_j)` on
    [B, T, D] with the default dim=1, i.e. the cosine over the *token* axis per channel, averaged
    over channels and windows, and only starts i = 1..L-n-1 (first and last layer never removed).
Scores come from the shared one-pass `lp.calib.CalibStats`, which also gives the patch scales.
The other variant's block is offered first to the held-out selection check (`lp.verify`): the run
warns when it is much better, and `pruner.rerank=2` keeps the better of the two rules' blocks.
"""

from lp.calib import VARIANTS, check_block, get_stats
from lp.pruners.base import MAX_ALTERNATIVES, PruneContext, Selection, StatsPruner, block_selection


class LinearPatchPruner(StatsPruner):
    name = "linearpatch"

    def __init__(self, n: int = 5, variant: str = "reference", rerank: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"pruner.variant={variant!r}; choose one of {list(VARIANTS)}")
        super().__init__(n, rerank)
        self.variant = variant

    def check(self, num_layers: int) -> None:
        check_block(f"pruner={self.name} (variant={self.variant})", self.n, num_layers, self.variant)

    def select(self, ctx: PruneContext) -> Selection:
        stats = get_stats(ctx)
        scores = stats.block_scores(self.n, self.variant)
        kind = "cosine_by_start" if self.variant == "paper" else "channel_cosine_by_start"
        sel = block_selection(self.name, scores, self.n, kind, variant=self.variant, calibration=stats.cost)
        other = "paper" if self.variant == "reference" else "reference"
        try:
            start = int(stats.block_scores(self.n, other).nan_to_num(float("-inf")).argmax())
        except ValueError:  # n too large for the reference rule's starts 1..L-n-1
            return sel
        block = list(range(start, start + self.n))
        sel.info["other_variant"] = {"variant": other, "block": [start, start + self.n]}
        if block != sel.removed:
            sel.info["alternatives"] = [block, *[a for a in sel.info["alternatives"] if a != block]][:MAX_ALTERNATIVES]
        return sel
