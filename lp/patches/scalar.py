"""`patch=scalar`: one magnitude ratio per cut, P = s I (Prune&Comp, Chen et al., AAAI 2026:
uniform compensation of the magnitude gap, foldable into the weights before the cut).

s = mean over channels c of [mean over windows of mean_t |h_b[t, c]| / mean_t |h_a[t, c]|],
i.e. the mean of the `diag` scales, as the official code (`magcomp.get_scale_params`) computes it.
"""

import torch

from lp.patches import register
from lp.patches.base import Fit, PatchKind


@register
class ScalarPatch(PatchKind):
    name = "scalar"
    paper = "Prune&Comp (Chen et al., AAAI 2026): P = s I, s = mean_c of the per-channel magnitude ratios"
    foldable = True

    def fit(self, source, a, b) -> Fit:
        s = source.stats.scales(a, b, "diag").double().mean()
        D = source.hidden_size
        return Fit(torch.eye(D, dtype=torch.float64) * s, torch.full((D,), s.item()), {"scale": s.item()})
