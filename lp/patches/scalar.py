"""`patch=scalar`: one magnitude ratio per cut, P = s I (Prune&Comp, Chen et al., AAAI 2026:
uniform compensation of the magnitude gap, foldable into the weights before the cut).

s = mean over channels c of [mean over windows of mean_t |h_b[t, c]| / mean_t |h_a[t, c]|],
i.e. the mean of the `diag` scales, as the official code (`magcomp.get_scale_params`) computes it.
"""

import torch
from torch import nn

from lp.models import Decoder
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


def arch_refusal(model: nn.Module) -> str | None:
    """Why a positive scalar patch cannot be folded into `model`'s architecture (`lp.fold`: every reader
    of the stream must be a scale-invariant RMSNorm, every writer o_proj / down_proj); None if it can."""
    dec = Decoder(model)
    fam = dec.family  # lp.families: which modules write to the stream and which norms read it
    norms = [("model.norm", dec.norm)]
    for i, layer in enumerate(dec.layers):
        writers = [w for w in fam.stream_writers if not isinstance(_get(layer, w), nn.Linear)]
        if writers:
            return f"layer {i} ({type(layer).__name__}) does not write to the stream through {' and '.join(fam.stream_writers)}"
        names = {n for n, m in layer.named_children() if "norm" in type(m).__name__.lower()}
        if fam.post_norms or names != set(fam.pre_norms):
            return (f"layer {i} ({type(layer).__name__}) has norms {sorted(names)}; folding needs exactly the "
                    f"pre-norms {' and '.join(fam.pre_norms)} (no sandwich/post norms)")
        norms += [(f"layer {i}.{n}", getattr(layer, n)) for n in sorted(names)]
    for name, norm in norms:
        if "rmsnorm" not in type(norm).__name__.lower() or getattr(norm, "bias", None) is not None:
            return f"{name} is a {type(norm).__name__}; folding needs a scale-invariant RMSNorm without bias"
    return None


def _get(module: nn.Module, path: str):
    """The submodule at dotted `path` of `module`, None if there is none."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
