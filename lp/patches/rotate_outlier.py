"""`patch=rotate_outlier`: LinearPatch with the massive channels left out of the rotation.

Motivation (lp issue 14): with a few *massive-activation* channels (100-1000x the median
magnitude), every Hadamard coordinate mostly carries the largest channel, so the rotated scales
follow that channel's growth, and a non-uniform H diag(s) H^T leaks the huge channel into every
other channel. Here, with O = massive channels (mean |h_a| or mean |h_b| above `outlier_factor`
times the median channel, dense model, calibration windows) and K = diag(1 outside O):

    P = diag(s_O) on O  +  K H diag(s') H^T K,
    s_O = the `diag` scales of the massive channels,
    s'_c = mean over windows of mean_t |(h_b K H)_c| / mean_t |(h_a K H)_c|   (rotated rest only)

so a massive channel is scaled alone and never mixed into the others. With no massive channel
this is exactly `rotate`. A `RotatePatch` subclass: the same basis check and fit shape
(`lp.patches.rotate.rotation_fit`); only the scales and the massive channels are its own.
"""

import torch

from lp.patches import register
from lp.patches.base import Fit
from lp.patches.rotate import RotatePatch, rotation_fit

DEFAULT_FACTOR = 20.0


def massive_channels(abs_a: torch.Tensor, abs_b: torch.Tensor, factor: float) -> torch.Tensor:
    """Bool [D]: channels whose mean |h| at a or b exceeds `factor` x that state's median channel."""
    big = lambda m: m > factor * m.median()  # noqa: E731
    return big(abs_a) | big(abs_b)


class RotatedRest:
    """Per window, mean over tokens of |(h K) H| at a and at b (float64 lists of [D])."""

    def __init__(self, keep: torch.Tensor, H: torch.Tensor):
        self.keep, self.H = keep.float(), H.float()
        self.ra, self.rb = [], []

    def update(self, xa, xb):
        keep, H = self.keep.to(xa.device), self.H.to(xa.device)
        self.ra.append(((xa * keep) @ H).abs().mean(1).double())  # on the device: one host copy in fit
        self.rb.append(((xb.to(xa.device) * keep) @ H).abs().mean(1).double())


@register
class RotateOutlierPatch(RotatePatch):
    name = "rotate_outlier"
    paper = "lp (issue 14): LinearPatch with massive channels scaled alone, outside the Hadamard mixing"

    def check(self, patch_cfg, hidden_size):
        super().check(patch_cfg, hidden_size)
        f = patch_cfg.get("outlier_factor", DEFAULT_FACTOR)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 1:
            raise ValueError(f"patch.outlier_factor={f!r} must be a number > 1 (times the median channel)")

    def outliers(self, source, a, b) -> torch.Tensor:
        am = source.stats.abs_mean.double().mean(0)  # [L+1, D]
        return massive_channels(am[a], am[b], float(source.cfg.get("outlier_factor", DEFAULT_FACTOR)))

    def accumulator(self, source, a, b):
        return RotatedRest(~self.outliers(source, a, b), source.rotation())

    def fit(self, source, a, b) -> Fit:
        acc = source.accumulated(self, a, b)
        ra, rb = torch.cat(acc.ra).cpu(), torch.cat(acc.rb).cpu()  # [W, D]
        s_rest = torch.where(ra > 0, rb / ra.clamp_min(1e-300), torch.ones_like(ra)).mean(0)
        s_diag = source.stats.scales(a, b, "diag").double()
        return rotation_fit(source.rotation(), s_rest, self.outliers(source, a, b), s_diag)
