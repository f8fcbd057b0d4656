"""`pruner=streamline`: LLM-Streamline's layer selection without its replacement layer
(Chen et al., "Compressing Large Language Models by Streamlining the Unimportant Layer", 2024).

Remove the contiguous block [j, j+n) maximising the mean over calibration tokens of
cos(h_j, h_{j+n}) (cosine over the hidden dim; h_l = stream entering dense layer l, h_L = last
layer output before the final norm); every start j = 0..L-n is allowed, first and last layer
included. Reads the shared one-pass `lp.calib.CalibStats`.
"""

from lp.calib import get_stats
from lp.pruners.base import PruneContext, Selection, StatsPruner, block_selection


class StreamlinePruner(StatsPruner):
    name = "streamline"

    def select(self, ctx: PruneContext) -> Selection:
        stats = get_stats(ctx)
        return block_selection(self.name, stats.block_scores(self.n, "paper"), self.n, "cosine_by_start",
                               calibration=stats.cost)
