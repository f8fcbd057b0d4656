"""`pruner=angular`: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (2024).

Remove the contiguous block [j, j+n) minimising the angular distance between its input and
output on the *last token* of each calibration window, averaged over windows:
    d(j, n) = mean_w (1/pi) * arccos cos(h_j[w, T-1], h_{j+n}[w, T-1])
(h_l = stream entering dense layer l, h_L = last layer output before the final norm; starts
j = 0..L-n). No healing fine-tune here. Reads the shared one-pass `lp.calib.CalibStats`.
"""

from lp.calib import get_stats
from lp.pruners.base import PruneContext, Selection, StatsPruner, block_selection


class AngularPruner(StatsPruner):
    name = "angular"

    def select(self, ctx: PruneContext) -> Selection:
        stats = get_stats(ctx)
        return block_selection(self.name, stats.angular_scores(self.n), self.n, "angular_distance_by_start",
                               lower_is_better=True, calibration=stats.cost)
