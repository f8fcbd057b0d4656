"""`patch=rotate`: LinearPatch (Chen et al., NeurIPS 2025), P = H diag(s) H^T.

H = the orthonormal basis `patch.hadamard` (`lp.hadamard.basis`; row-vector convention x -> x H), and
s_c = mean over calibration windows of mean_t |(h_b H)_c| / mean_t |(h_a H)_c| (dense model),
read from the shared calibration statistics. P is symmetric with eigenvalues s.

`RotatePatch` is also the base of the kinds that build on this rotation (`rotate_outlier`): they
share its basis check and its fit shape (`rotation_fit`), and only say how the scales are measured.
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


def rotation_fit(R: torch.Tensor, s: torch.Tensor, massive: torch.Tensor | None = None,
                 s_massive: torch.Tensor | None = None) -> Fit:
    """The `Fit` of a rotated patch. Without `massive`: P = R diag(s) R^T, scales s. With `massive`
    (bool [D]) and K = diag(1 outside `massive`): P = K R diag(s) R^T K + diag(`s_massive` on `massive`),
    scales = `s_massive` on the massive channels and s elsewhere (float32), info = their channel
    indices. `info` always holds the min/median/max of the rotated scales s."""
    if massive is None:
        return Fit(rotated(R, s), s, scale_info(s))
    keep = (~massive).double()
    W = rotated(R, s) * keep[:, None] * keep[None, :]
    W = W + torch.diag(torch.where(massive, s_massive, torch.zeros_like(s_massive)))
    scales = torch.where(massive, s_massive, s)
    return Fit(W, scales.float(), {"massive_channels": massive.nonzero().flatten().tolist(), **scale_info(s)})


@register
class RotatePatch(PatchKind):
    name = "rotate"
    paper = "Chen et al., NeurIPS 2025 (LinearPatch): P = H diag(s) H^T, s from rotated magnitudes"
    uses_rotation = True

    def check(self, patch_cfg, hidden_size):
        """The basis `patch.hadamard` needs a matrix for the hidden size, or `patch.hadamard_fallback_seed` (an int)."""
        basis = hd.Basis.of(patch_cfg)
        if basis.spec(hidden_size) is None:
            raise ValueError(f"patch={self.name}: {hd.unsupported(hidden_size, basis.kind)} "
                             "(set patch.hadamard_fallback_seed=<int> to opt in)")

    def fit(self, source, a, b) -> Fit:
        return rotation_fit(source.rotation(), source.rotated_stats().scales(a, b, "rotate"))
