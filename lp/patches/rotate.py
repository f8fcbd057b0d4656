"""`patch=rotate`: LinearPatch (Chen et al., NeurIPS 2025), P = H diag(s) H^T.

H = the orthonormal basis `patch.hadamard` (`lp.hadamard.basis`; row-vector convention x -> x H), and
s_c = mean over calibration windows of mean_t |(h_b H)_c| / mean_t |(h_a H)_c| (dense model),
read from the shared calibration statistics. P is symmetric with eigenvalues s.
"""

import torch

from lp import hadamard as hd
from lp.patches import register
from lp.patches.base import Fit, PatchKind
from lp.patches.diag import scale_info


def rotated(R: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """R diag(s) R^T in float64, exactly symmetrised."""
    R = R.double()
    P = (R * s.double()) @ R.T
    return (P + P.T) / 2


def check_rotation(patch_cfg, hidden_size: int, kind: str) -> None:
    """The basis `patch.hadamard` needs a matrix for the hidden size, or `patch.hadamard_fallback_seed` (an int)."""
    basis = patch_cfg.get("hadamard", "constructed")
    if hd.spec(hidden_size, basis, patch_cfg.get("hadamard_seed"), patch_cfg.get("hadamard_fallback_seed")) is None:
        raise ValueError(f"patch={kind}: {hd.unsupported(hidden_size, basis)} "
                         "(set patch.hadamard_fallback_seed=<int> to opt in)")


@register
class RotatePatch(PatchKind):
    name = "rotate"
    paper = "Chen et al., NeurIPS 2025 (LinearPatch): P = H diag(s) H^T, s from rotated magnitudes"
    uses_rotation = True

    def check(self, patch_cfg, hidden_size):
        check_rotation(patch_cfg, hidden_size, self.name)

    def fit(self, source, a, b) -> Fit:
        s = source.rotated_stats().scales(a, b, "rotate")
        return Fit(rotated(source.rotation(), s), s, scale_info(s))
