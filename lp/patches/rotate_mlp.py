"""`patch=rotate_mlp`: LinearPatch's shape T = H diag(s) H^T at the `lstsq_mlp` site (the MLP output M
of the last kept layer before the cut), so the paper's patch has a foldable form.

With H the orthonormal basis `patch.hadamard` (rows = basis vectors, x -> x H) and Y = h_b - h_a + M,
||M H diag(s) H^T - Y||^2 = sum_c ||(M H)_c s_c - (Y H)_c||^2 separates per direction c, so the
least-squares s (ridge lam = ridge * tr(M^T M) / D, as `lstsq_mlp`) is exact per direction:

    s_c = (H^T M^T Y H)_cc / ((H^T M^T M H)_cc + lam)

from the same float64 sums as `lstsq_mlp` (one pass up to layer b). Folds into `down_proj` like it.
"""

import torch

from lp.patches import register
from lp.patches._mlp import MlpSite
from lp.patches.base import Fit
from lp.patches.lstsq import DEFAULT_RIDGE, check_ridge
from lp.patches.rotate import RotatePatch, rotation_fit


def direction_scales(mtm: torch.Tensor, mty: torch.Tensor, H: torch.Tensor, ridge: float) -> torch.Tensor:
    """s [D] float64: the per-direction ridge least-squares scales in basis `H` (see module docstring)."""
    H = H.double()
    lam = ridge * torch.trace(mtm) / mtm.shape[0]
    num = ((mty @ H) * H).sum(0)  # diag(H^T mty H)
    den = ((mtm @ H) * H).sum(0) + lam
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))


@register
class RotateMlpPatch(MlpSite, RotatePatch):
    name = "rotate_mlp"
    paper = ("lp: LinearPatch's T = H diag(s) H^T on the last kept layer's MLP output M, s by least squares "
             "per Hadamard direction, folded into its down_proj")

    def check(self, patch_cfg, hidden_size):
        super().check(patch_cfg, hidden_size)  # the basis
        check_ridge(patch_cfg)  # patch.ridge

    def fit(self, source, a, b) -> Fit:
        acc = source.accumulated(self, a, b)
        ridge = float(source.cfg.get("ridge", DEFAULT_RIDGE))
        fit = rotation_fit(source.rotation(), direction_scales(acc.xtx, acc.xty, source.rotation(), ridge))
        fit.info.update(ridge=ridge, tokens=acc.tokens)
        return fit
