"""Folding patches into the pruned model's own weights, so that a saved folder is a plain checkpoint of
the base architecture (`lp.export` layout `folded`). Row vectors; nn.Linear computes y = x W^T + b.

Why folding a scalar is exact (up to the norms' eps): every module that *reads* the residual stream
of a Llama-style decoder reads it through a scale-invariant RMSNorm (input_layernorm,
post_attention_layernorm, the final norm), so RMSNorm(c x) = RMSNorm(x) for c > 0 (exactly when eps=0;
relative deviation ~ eps (1/c^2 - 1) / (2 mean x^2) otherwise). A patch s at a cut multiplies the
stream there by s. Dividing every *writer* after the cut (each later layer's `o_proj` and `down_proj`,
weight and bias) by s instead leaves the stream after the cut equal to (patched stream) / s everywhere,
and every reader sees the same normalised input: the same logits. Writers *before* the cut
(embeddings included) are untouched, so tied embeddings, Gemma-style embedding scaling and a cut at
the very start need no special case; a cut at the end (the patch feeds the final norm) folds into
nothing. Several cuts compose: a layer after cuts with scales s1, s2 divides by s1*s2.
The argument fails, and `fold_refusal` says so, when: s <= 0 (RMSNorm(-x) = -RMSNorm(x)) or s is not
finite; the patch is not exactly s*I; a layer writes to the stream through anything other than
`self_attn.o_proj` / `mlp.down_proj` (sandwich/post norms as in Gemma2/3 or OLMo2, parallel blocks,
MoE experts); a norm is not an RMSNorm or has a bias. Unknown forward code the check cannot see
(e.g. a constant added to the stream) is caught by the verification.

Why folding an mlp-site patch is exact (`lstsq_mlp`, `rotate_mlp`): T multiplies the output
y = x W^T + b of the `down_proj` of the last kept layer before the cut, and y T = x (T^T W)^T + b T is
that same linear layer with weight T^T W and bias b T: no norm is involved. In memory the patch computes
y T through exactly those folded weights (`lp.patches._mlp.folded_linear`), so the folded checkpoint
gives the same logits bit for bit, in any dtype. Refused when the layer normalises the MLP output before
the residual add (Gemma2/3 `post_feedforward_layernorm`): N(y T) != N(y) T, so only a diagonal T folds
(into the norm's weight); or when there is no `mlp.down_proj` nn.Linear (MoE).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lp.devices import state_dict
from lp.models import Decoder
from lp.patch import LinearPatch, removed_runs
from lp.patches._mlp import folded_linear, site_name
from lp.patches.scalar import arch_refusal as scalar_fold_refusal


def scalar_of(patch: LinearPatch) -> float | None:
    """s if `patch.weight` is exactly s * I, else None."""
    w = patch.weight.detach()
    s = w[0, 0].item()
    return s if torch.equal(w, s * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)) else None


def is_diagonal(w: torch.Tensor) -> bool:
    return bool(torch.equal(w, torch.diag(torch.diagonal(w))))


def mlp_fold_refusal(model: nn.Module, patch: LinearPatch, patches: dict[int, LinearPatch]) -> str | None:
    """Why the mlp-site `patch` (T on the MLP output of the last kept layer before its cut) cannot be
    folded into that layer of the stripped pruned `model`; None if it can. Folding targets: `down_proj`
    (W <- T^T W, b <- b T: exact for any T), or, when the layer normalises the MLP output before the
    residual add (Gemma2/3 `post_feedforward_layernorm`), that norm's weight for a diagonal T only."""
    layer = Decoder(model).layers[mlp_layer_index(patch, patches)]
    if not isinstance(getattr(getattr(layer, "mlp", None), "down_proj", None), nn.Linear):
        return f"the layer before cut [{patch.start}, {patch.end}) has no mlp.down_proj nn.Linear"
    site = site_name(layer)
    if site != "mlp" and not (is_diagonal(patch.weight.detach()) and getattr(getattr(layer, site), "weight", None) is not None):
        return (f"the layer before cut [{patch.start}, {patch.end}) normalises its MLP output ({site}); the "
                f"{patch.kind} patch is not diagonal, so it does not fold into that norm's weight")
    return None


def fold_refusal(model: nn.Module, patches: dict[int, LinearPatch]) -> str | None:
    """Why the patches of `model` (a stripped pruned model) cannot all be folded exactly; None if they can."""
    for p in patches.values():
        if p.site == "mlp":
            why = mlp_fold_refusal(model, p, patches)
            if why is not None:
                return why
            continue
        s = scalar_of(p)
        if s is None:
            return f"the {p.kind} patch at cut [{p.start}, {p.end}) is not a uniform scalar s*I"
        if not (math.isfinite(s) and s > 0):
            return f"the scalar patch at cut [{p.start}, {p.end}) has s={s}; folding needs a finite s > 0"
    if any(p.site != "mlp" for p in patches.values()):
        return scalar_fold_refusal(model)
    return None


def norm_offset(norm: nn.Module) -> float:
    """c in norm(x) = x_hat * (c + weight): 1 for Gemma's RMSNorm (weight stored as a delta from 1), else 0."""
    return 1.0 if "gemma" in type(norm).__name__.lower() else 0.0


def folded_state_dict(model: nn.Module, patches: dict[int, LinearPatch],
                      all_patches: dict[int, LinearPatch] | None = None) -> tuple[dict, list[dict]]:
    """State dict of the stripped pruned `model` with `patches` folded into its weights (each must pass
    `fold_refusal`); returns (state dict, one record per cut for `lp_patch.json`, by cut start).
    `all_patches` (default `patches`): every cut of the model, for the pruned layer numbering.

    * mlp-site T at cut [a, b) (the last kept layer k before it): `down_proj` weight [out, in] <- T^T W
      and bias <- b T (y = x W^T + b, so y T = x (T^T W)^T + b T); with a post-feedforward norm (T
      diagonal), the norm's weight <- (c + w) diag(T) - c, `norm_offset` c.
    * scalar s (input site): every o_proj / down_proj after the cut divided by s (module docstring).
    Both compose (an mlp fold and scalar factors on the same down_proj multiply). Arithmetic in float32,
    cast back to each tensor's dtype; the model is not modified."""
    all_patches = all_patches or patches
    dec = Decoder(model)
    names = {id(m): n for n, m in model.named_modules()}
    new: dict[str, torch.Tensor] = {}  # key -> folded float32 value
    sd = dict(state_dict(model))  # offloaded weights brought to host memory (lp.devices)

    def value(mod, pname):
        key = f"{names[id(mod)]}.{pname}"
        return key, new.get(key, sd[key].float())

    records = []
    factor = [1.0] * dec.num_layers
    for p in sorted(patches.values(), key=lambda p: p.start):
        if p.site == "mlp":
            k = mlp_layer_index(p, all_patches)
            layer = dec.layers[k]
            site = site_name(layer)
            if site == "mlp":  # the same arithmetic as the in-memory patch: lp.patch.folded_linear
                down, name = layer.mlp.down_proj, names[id(layer.mlp.down_proj)]
                w, b = folded_linear(sd[f"{name}.weight"], None if down.bias is None else sd[f"{name}.bias"],
                                     p.weight.detach())
                new[f"{names[id(down)]}.weight"] = w.float()
                if b is not None:
                    new[f"{names[id(down)]}.bias"] = b.float()
                where = f"{names[id(down)]} (W <- T^T W, b <- b T)"
            else:
                norm = getattr(layer, site)
                c = norm_offset(norm)
                key, v = value(norm, "weight")
                new[key] = (c + v) * torch.diagonal(p.weight.detach().float()).to(v.device) - c
                where = f"{names[id(norm)]}.weight (diagonal T)"
            records.append({"start": p.start, "end": p.end, "kind": p.kind, "folded_into": where})
            continue
        s, first = scalar_of(p), pruned_index(p, all_patches)
        for k in range(first, dec.num_layers):
            factor[k] /= s
        records.append({"start": p.start, "end": p.end, "kind": p.kind, "scale": s,
                        "folded_into": f"o_proj/down_proj of pruned layers {first}..{dec.num_layers - 1}"
                        if first < dec.num_layers else "nothing (the final norm is scale-invariant)"})
    for k, f in enumerate(factor):
        if f == 1.0:
            continue
        layer = dec.layers[k]
        for mod in (layer.self_attn.o_proj, layer.mlp.down_proj):
            for pname, _t in mod.named_parameters(recurse=False):
                key, v = value(mod, pname)
                new[key] = v * f
    for key, v in new.items():
        sd[key] = v.to(sd[key].dtype)
    return sd, records


def pruned_index(patch: LinearPatch, patches: dict[int, LinearPatch]) -> int:
    """Pruned index of the kept layer the patch feeds (= the pruned layer count for a cut at the end)."""
    return patch.end - sum(b - a for a, b in removed_runs(patches) if b <= patch.end)


def mlp_layer_index(patch: LinearPatch, patches: dict[int, LinearPatch]) -> int:
    """Pruned index of the last kept layer before the cut (dense start - 1): an mlp-site patch's layer."""
    return patch.start - 1 - sum(b - a for a, b in removed_runs(patches) if b <= patch.start - 1)
