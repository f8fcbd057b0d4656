"""`patch=lstsq`: a D x D linear map fitted in closed form on the calibration activations,
h_a -> h_b (ridge-regularised least squares, as ReplaceMe (Shopkhoev et al., 2025) fits its linear
replacement of the removed block):

    W = argmin_W ||X W - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y,   lam = ridge * tr(X^T X) / D

with X, Y = h_a, h_b of the dense model on every calibration token (rows). The sums X^T X and
X^T Y are accumulated in float64 over calibration batches (one pass up to layer b).
"""

import torch

from lp.patches import register
from lp.patches.base import Fit, PatchKind

DEFAULT_RIDGE = 1e-4  # patch.ridge where a config leaves it out (conf/patch/lstsq.yaml sets it for users)


class GramSums:
    """Running X^T X, X^T Y (float64 [D, D]) and the token count over calibration batches. The sums
    accumulate on the device of the activations (no host copy per batch); `xtx` / `xty` read them
    back to host memory."""

    def __init__(self, dim: int):
        self._xtx = torch.zeros(dim, dim, dtype=torch.float64)
        self._xty = torch.zeros(dim, dim, dtype=torch.float64)
        self.tokens = 0

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        x = xa.reshape(-1, xa.shape[-1]).double()
        y = xb.reshape(-1, xb.shape[-1]).to(x.device).double()
        self._xtx, self._xty = self._xtx.to(x.device), self._xty.to(x.device)  # no-op after the first batch
        self._xtx += x.T @ x
        self._xty += x.T @ y
        self.tokens += x.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        return self._xtx.cpu()

    @property
    def xty(self) -> torch.Tensor:
        return self._xty.cpu()


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """(X^T X + lam I)^-1 X^T Y with lam = ridge * tr(X^T X) / D, float64 (Cholesky when positive definite)."""
    D = xtx.shape[0]
    lam = ridge * torch.trace(xtx) / D
    A = xtx + lam * torch.eye(D, dtype=xtx.dtype)
    chol, info = torch.linalg.cholesky_ex(A)
    if info.item() == 0:
        return torch.cholesky_solve(xty, chol)
    return torch.linalg.lstsq(A, xty).solution  # singular (ridge=0, fewer tokens than dims)


def check_ridge(patch_cfg) -> None:
    """`patch.ridge` (default `DEFAULT_RIDGE`) is a number >= 0."""
    ridge = patch_cfg.get("ridge", DEFAULT_RIDGE)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or ridge < 0:
        raise ValueError(f"patch.ridge={ridge!r} must be a number >= 0 (relative to tr(X^T X)/D)")


@register
class LstsqPatch(PatchKind):
    name = "lstsq"
    paper = "ReplaceMe-style ridge least squares (Shopkhoev et al., 2025): W = (X^T X + lam I)^-1 X^T Y"

    def check(self, patch_cfg, hidden_size):
        check_ridge(patch_cfg)

    def accumulator(self, source, a, b):
        return GramSums(source.hidden_size)

    def fit(self, source, a, b) -> Fit:
        acc = source.accumulated(self, a, b)
        ridge = float(source.cfg.get("ridge", DEFAULT_RIDGE))
        W = ridge_solve(acc.xtx, acc.xty, ridge)
        return Fit(W, None, {"ridge": ridge, "tokens": acc.tokens})
