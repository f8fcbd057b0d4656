"""`patch=diag`: channel-wise scaling only, P = diag(s) (LinearPatch's "w/o Hadamard" ablation).

s_c = mean over calibration windows of mean_t |h_b[t, c]| / mean_t |h_a[t, c]| (dense model),
read from the shared calibration statistics (`lp.calib.CalibStats.scales(a, b, "diag")`).
"""

import torch

from lp.patches import register
from lp.patches.base import Fit, PatchKind


def scale_info(s: torch.Tensor) -> dict:
    return {"scale_min": s.min().item(), "scale_median": s.median().item(), "scale_max": s.max().item()}


@register
class DiagPatch(PatchKind):
    name = "diag"
    paper = "Chen et al., NeurIPS 2025 (LinearPatch), ablation without the Hadamard rotation: P = diag(s)"

    def fit(self, source, a, b) -> Fit:
        s = source.stats.scales(a, b, "diag")
        return Fit(torch.diag(s.double()), s, scale_info(s))
