"""`patch=lstsq_mlp`: ReplaceMe (Shopkhoev et al., 2025): a D x D map T on the MLP output M of the
last kept layer before the cut, ridge least squares so that (h_a - M) + M T ~ h_b:

    T = argmin_T ||M T - Y||^2 + lam ||T||^2 = (M^T M + lam I)^-1 M^T Y,   Y = h_b - h_a + M,
    lam = ridge * tr(M^T M) / D

on every calibration token of the dense model (sums in float64, one pass up to layer b). T acts on
the MLP output ("mlp" site, `lp.patches._mlp`) and folds exactly into that layer's `down_proj`
(W_down <- T^T W_down in nn.Linear's [out, in] layout), so a saved model is a plain checkpoint.
"""

from lp.patches import register
from lp.patches._mlp import MlpSite
from lp.patches.base import Fit, PatchKind
from lp.patches.lstsq import DEFAULT_RIDGE, check_ridge, ridge_solve


@register
class LstsqMlpPatch(MlpSite, PatchKind):
    name = "lstsq_mlp"
    paper = ("ReplaceMe (Shopkhoev et al., 2025): T = (M^T M + lam I)^-1 M^T (h_b - h_a + M) on the last kept "
             "layer's MLP output M, folded into its down_proj")

    def check(self, patch_cfg, hidden_size):
        check_ridge(patch_cfg)  # patch.ridge

    def fit(self, source, a, b) -> Fit:
        acc = source.accumulated(self, a, b)
        ridge = float(source.cfg.get("ridge", DEFAULT_RIDGE))
        return Fit(ridge_solve(acc.xtx, acc.xty, ridge), None, {"ridge": ridge, "tokens": acc.tokens})
