"""Shared by the "mlp"-site kinds (`lstsq_mlp`, `rotate_mlp`): where the patch sits and what it fits on.

Conventions (row vectors, dense numbering). For the cut removing [a, b), layer a-1 is the last kept
layer before it; M = the output of that layer's MLP as it is added to the residual stream (the
`mlp` module's output; for Gemma2/3, the output of `post_feedforward_layernorm`), so that
h_a = (h_a - M) + M. The patch T [D, D] replaces M by M T: the pruned model's stream after the cut
is (h_a - M) + M T, fitted so that it approximates h_b. With y = x W^T for nn.Linear (weight
[out, in]), down_proj(x) T = x (T^T W_down)^T + bias T, so T folds exactly into `down_proj`
(`lp.export`): no norm or scale invariance involved, only linear algebra.

Post-feedforward norms (Gemma2/3): M = N(down_proj(x)) and N(y T) != N(y) T for a general T; only a
diagonal T folds (into N's weight). These kinds fit a full T, so such a layer is refused before fitting.
"""

from __future__ import annotations

import torch
from accelerate.utils import align_module_device
from torch import nn

from lp.models import Decoder
from lp.patches.lstsq import GramSums

POST_NORMS = ("post_feedforward_layernorm",)


def site_name(layer: nn.Module) -> str:
    """The child of decoder `layer` whose output is the MLP's contribution to the residual stream."""
    for name in POST_NORMS:
        if getattr(layer, name, None) is not None:
            return name
    return "mlp"


def site(layer: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of the module whose output is M: `mlp.down_proj` (M = its output), or the
    post-feedforward norm where there is one (`site_name`). The patch wraps this module."""
    name = site_name(layer)
    return (layer.mlp, "down_proj") if name == "mlp" else (layer, name)


def refusal(model: nn.Module, a: int, full: bool = True) -> str | None:
    """Why an "mlp"-site patch cannot bridge the cut starting at dense layer `a` of `model` (None
    when it can). `full`: the patch is a general D x D matrix (not diagonal)."""
    if a == 0:
        return ("the cut starts at layer 0: there is no kept layer before it whose MLP output could carry "
                "the patch (keep layer 0, or use an input-site kind such as lstsq/rotate)")
    layer = Decoder(model).layers[a - 1]
    mlp = getattr(layer, "mlp", None)
    if not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        return (f"layer {a - 1} ({type(layer).__name__}) has no mlp.down_proj nn.Linear (MoE or another MLP "
                "layout): nothing to fold the patch into")
    name = site_name(layer)
    if name != "mlp" and full:
        return (f"layer {a - 1} ({type(layer).__name__}) normalises the MLP output ({name}) before the residual "
                "add: a full D x D matrix does not fold through that norm (only a diagonal one would fold "
                "into its weight); use an input-site kind (lstsq, rotate) there")
    return None


def check_cuts(kind: str, model: nn.Module, runs) -> None:
    """ValueError naming the kind and the cut when `refusal` refuses any of `runs`."""
    for a, b in runs:
        why = refusal(model, a)
        if why is not None:
            raise ValueError(f"patch={kind} cannot bridge the cut [{a}, {b}): {why}")


class MlpGram(GramSums):
    """Running M^T M and M^T Y (float64 [D, D], `xtx` / `xty` of `GramSums`) with Y = h_b - h_a + M (the
    target of M T), over the calibration batches; M is captured by a forward hook on layer a-1's `site`
    (`attach`)."""

    def __init__(self, dim: int, a: int):
        super().__init__(dim)
        self.a = a
        self._m: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> list:
        layer = Decoder(model).layers[self.a - 1]

        def grab(_mod, _args, out):
            self._m = (out[0] if isinstance(out, tuple) else out).float()

        parent, name = site(layer)
        return [getattr(parent, name).register_forward_hook(grab)]

    def update(self, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if self._m is None or self._m.shape != xa.shape:
            raise RuntimeError(f"MLP output of layer {self.a - 1} not captured for this batch")
        m = self._m.reshape(-1, xa.shape[-1]).double()
        y = (xb - xa.to(xb.device)).reshape(-1, xa.shape[-1]).to(m.device).double() + m
        super().update(m, y)
        self._m = None


class Wrapper(nn.Module):
    """A module wrapping `inner` with a `patch`: attribute lookups that fail on the wrapper (e.g.
    `attention_type`, `layer_idx`, `weight`) are forwarded to `inner` (base of `lp.patch.Patched` and
    `OutputPatched`)."""

    def __init__(self, inner: nn.Module, patch: nn.Module):
        super().__init__()
        self.patch = patch
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "patch"):
                raise
            return getattr(self.inner, name)


class MlpSite:
    """What the MLP-site kinds (lstsq_mlp, rotate_mlp) share: where they sit, that they fold, the early
    refusal of cuts they cannot bridge, and their accumulator (the float64 sums of `MlpGram`)."""

    site = "mlp"
    foldable = True

    def check_cuts(self, model, runs):
        check_cuts(self.name, model, runs)

    def accumulator(self, source, a, b):
        return MlpGram(source.hidden_size, a)


class OutputPatched(Wrapper):
    """`inner` with `patch` P applied to its output. For an `nn.Linear` inner (a layer's `down_proj`,
    y = x W^T + b) the output y P is computed as the folded layer: weight (P^T W) and bias (b P) in
    float32, cast to the layer's dtype, then `F.linear` -- bit for bit what the saved checkpoint
    (`lp.fold.folded_state_dict`) computes, in any dtype; P trains through it. For another inner
    (a post-feedforward norm): x -> patch(inner(x)). Attribute lookups that fail go to `inner`."""

    def forward(self, *args, **kwargs):
        if isinstance(self.inner, nn.Linear):
            with align_module_device(self.inner):  # onloads an offloaded down_proj (accelerate), else a no-op
                w, b = folded_linear(self.inner.weight, self.inner.bias, self.patch.weight)
            x = args[0] if args else kwargs["input"]
            return torch.nn.functional.linear(x.to(w.device), w, b)
        out = self.inner(*args, **kwargs)
        return (self.patch(out[0]), *out[1:]) if isinstance(out, tuple) else self.patch(out)


def folded_linear(weight: torch.Tensor, bias: torch.Tensor | None, P: torch.Tensor):
    """(P^T W, b P) for a linear layer y = x W^T + b (W [out, in]) followed by y -> y P: float32
    arithmetic, cast back to W's dtype (the one definition both the in-memory patch and the export use)."""
    P = P.to(device=weight.device, dtype=torch.float32)
    with torch.autocast(weight.device.type, enabled=False):  # float32 also under distillation's autocast
        w = (P.T @ weight.float()).to(weight.dtype)
        return w, None if bias is None else (bias.float() @ P).to(bias.dtype)
