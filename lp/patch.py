"""LinearPatch: one symmetric D x D matrix per cut, bridging the pruning interface.

Method (Chen et al., NeurIPS 2025, "A Simple Linear Patch Revives Layer-Pruned LLMs"): for a
removed contiguous run [a, b) of dense layers, with H the orthonormal Hadamard matrix
(`lp.hadamard.hadamard`, row-vector convention x -> x H) and calibration statistics of the
*dense* model (`lp.calib.CalibStats`),

    s_c = mean over windows of [ mean_t |(h_b H)_c| / mean_t |(h_a H)_c| ],   P = H diag(s) H^T

(`patch.kind=rotate`; `diag`: H = I, P = diag(s)). P is symmetric with eigenvalues s. The stream
leaving the last kept layer before the cut (= h_a of the pruned model) is multiplied by P
before it enters the first kept layer after it: x -> x P.

Where the patch lives: `Patched` wraps the first kept module after the cut and multiplies its
first argument (the hidden states) by P, so the patch is a real module of the model (moves with
`.to()`, trains, works with KV-cache generation, independent of the layers' return type):
  * a cut in the middle, [a, b) with 0 < a and b < L: wraps dense layer b;
  * a cut at the start, a = 0: wraps dense layer b as well; the patch acts on the embedding output;
  * a cut at the end, b = L: wraps the final norm; the patch acts on the last kept layer's output
    before the final norm.
One patch per cut: removing several separate runs (e.g. [1, 2, 5] = runs [1, 3) and [5, 6))
gives each run its own patch, scaled from h_a and h_b measured on the dense model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lp import hadamard as hd
from lp.calib import get_stats
from lp.models import Decoder

log = logging.getLogger(__name__)

PATCH_KINDS = ("diag", "rotate")


class LinearPatch(nn.Module):
    """x -> (x.float() @ weight).to(x.dtype); `weight` [D, D] is an fp32 trainable parameter.

    `start`, `end` = the removed dense run [start, end) this patch bridges; `num_layers` = dense L;
    `scales` (optional, [D]) = the calibration scales it was built from (metadata for reports).
    """

    def __init__(self, weight: torch.Tensor, start: int, end: int, num_layers: int, kind: str = "rotate",
                 scales: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"LinearPatch weight must be square [D, D], got {tuple(weight.shape)}")
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"LinearPatch cut [{start}, {end}) is not a block of layers 0..{num_layers - 1}")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.start, self.end, self.num_layers, self.kind = int(start), int(end), int(num_layers), kind
        self.scales = None if scales is None else scales.detach().float().cpu().clone()  # metadata, not a buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32)  # no-op unless the model was cast/split
        return (x.float() @ w).to(x.dtype)

    def extra_repr(self) -> str:
        return f"cut=[{self.start}, {self.end}), dim={self.weight.shape[0]}, kind={self.kind}"


class Patched(nn.Module):
    """`inner` (a decoder layer, or the final norm for a cut at the end) with `patch` applied to its
    first argument (hidden_states). Other args/kwargs pass through unchanged; attribute lookups
    that fail on the wrapper (e.g. `attention_type`, `layer_idx`) are forwarded to `inner`."""

    def __init__(self, inner: nn.Module, patch: LinearPatch):
        super().__init__()
        self.patch = patch
        self.inner = inner

    def forward(self, *args, **kwargs):
        if args:
            args = (self.patch(args[0]), *args[1:])
        else:
            kwargs["hidden_states"] = self.patch(kwargs["hidden_states"])
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "patch"):
                raise
            return getattr(self.inner, name)


# --------------------------------------------------------------------------- construction
def check_patch(patch_cfg, hidden_size: int) -> None:
    """Validate `patch.*` against the model's hidden size before any weights load."""
    kind = patch_cfg.kind
    if kind == "none":
        return
    if kind not in PATCH_KINDS:
        raise ValueError(f"patch.kind={kind!r}; choose one of {['none', *PATCH_KINDS]}")
    seed = patch_cfg.get("hadamard_fallback_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"patch.hadamard_fallback_seed={seed!r} must be null or an integer")
    kind_h, seed_h = patch_cfg.get("hadamard", "constructed"), patch_cfg.get("hadamard_seed")
    if hd.spec(hidden_size, kind_h, seed_h, seed) is None:  # also checks the basis name and its seed
        if kind == "rotate":
            raise ValueError(f"patch=rotate: {hd.unsupported(hidden_size, kind_h)} "
                             "(set patch.hadamard_fallback_seed=<int> to opt in)")


def runs_of(removed) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of a set of layer indices: [1, 2, 5] -> [(1, 3), (5, 6)]."""
    runs: list[list[int]] = []
    for i in sorted(int(i) for i in removed):
        if runs and i == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return [tuple(r) for r in runs]


def patch_matrix(scales: torch.Tensor, kind: str, rotation: torch.Tensor | None = None) -> torch.Tensor:
    """P [D, D] float32: `rotate`: R diag(s) R^T (float64, exactly symmetrised); `diag`: diag(s)."""
    s = scales.double()
    if kind == "diag":
        return torch.diag(s).float()
    if kind != "rotate":
        raise ValueError(f"patch kind={kind!r}; choose one of {list(PATCH_KINDS)}")
    R = rotation.double()
    P = (R * s) @ R.T
    return ((P + P.T) / 2).float()


def build_patches(ctx, removed, patch_cfg) -> tuple[dict[int, LinearPatch], dict]:
    """One LinearPatch per contiguous run of `removed` (dense indices), from the cached `CalibStats`
    of `ctx` (the same object the similarity pruners read). Returns `(patches keyed by each run's
    first removed layer a, info for result.json)`. Call before `drop_layers`, insert after it."""
    kind = patch_cfg.kind
    if kind not in PATCH_KINDS:
        raise ValueError(f"patch.kind={kind!r}; build_patches needs one of {list(PATCH_KINDS)}")
    dec = Decoder(ctx.model)
    L, D = dec.num_layers, dec.hidden_size
    seed = patch_cfg.get("hadamard_fallback_seed")
    check_patch(patch_cfg, D)
    runs = runs_of(removed)
    if not runs:
        raise ValueError("build_patches: no layers removed, nothing to patch")
    stats = get_stats(ctx, fallback_seed=seed)
    R = None
    if kind == "rotate":
        basis = dict(kind=patch_cfg.get("hadamard", "constructed"), seed=patch_cfg.get("hadamard_seed"),
                     fallback_seed=seed)
        rotation = hd.spec(D, **basis)
        if stats.meta.get("rotation") != rotation:  # scales measured in another basis than P uses
            raise ValueError(f"calibration statistics were rotated by {stats.meta.get('rotation')!r} but the "
                             f"patch uses basis {rotation!r}: build the PruneContext with the patch's basis")
        R = hd.basis(D, basis["kind"], basis["seed"], fallback_seed=seed)
    device = next(ctx.model.parameters()).device
    patches, cuts = {}, []
    for a, b in runs:
        s = stats.scales(a, b, kind)
        patches[a] = LinearPatch(patch_matrix(s, kind, R), a, b, L, kind, s).to(device)
        cuts.append({"start": a, "end": b, "before": b if b < L else "norm",
                     "scale_min": s.min().item(), "scale_median": s.median().item(), "scale_max": s.max().item()})
    info = {"kind": kind, "rotation": rotation if kind == "rotate" else None,
            "hadamard": basis["kind"] if kind == "rotate" else None,
            "hadamard_seed": basis["seed"] if kind == "rotate" else None, "cuts": cuts,
            "num_patches": len(patches), "params": sum(p.weight.numel() for p in patches.values()),
            "calibration": stats.cost}
    return patches, info


# --------------------------------------------------------------------------- placement
def insert_patches(model: nn.Module, patches: dict[int, LinearPatch]) -> nn.Module:
    """Wrap the first kept module after each cut in the *pruned* model (call after `drop_layers`).

    Dense run [a, b) -> pruned index b - (#removed layers below b) of the next kept layer, or the
    final norm when b = L. Checks that the model's layer count is L - (#removed).
    """
    if not patches:
        return model
    dec = Decoder(model)
    ps = sorted(patches.values(), key=lambda p: p.start)
    L = ps[0].num_layers
    runs = [(p.start, p.end) for p in ps]
    if any(p.num_layers != L for p in ps) or any(b > a2 for (_, b), (a2, _) in zip(runs, runs[1:], strict=False)):
        raise ValueError(f"patches overlap or come from different models: cuts {runs}")
    removed = sum(b - a for a, b in runs)
    if dec.num_layers != L - removed:
        raise ValueError(f"insert_patches: the model has {dec.num_layers} layers but cuts {runs} of a "
                         f"{L}-layer model leave {L - removed}; call it after drop_layers")
    if find_patches(model):
        raise ValueError("insert_patches: the model already holds patches (strip_patches first)")
    for p in ps:
        if p.end == L:
            dec.backbone.norm = Patched(dec.backbone.norm, _on_device_of(p, dec.backbone.norm))
        else:
            idx = p.end - sum(b - a for a, b in runs if b <= p.end)
            dec.layers[idx] = Patched(dec.layers[idx], _on_device_of(p, dec.layers[idx]))
    return model


def _on_device_of(patch: LinearPatch, module: nn.Module) -> LinearPatch:
    """The patch on the device of the module it feeds (matters for device_map-split models)."""
    param = next(module.parameters(), None)
    return patch.to(param.device) if param is not None else patch


def find_patches(model: nn.Module) -> list[LinearPatch]:
    """The LinearPatch modules inside `model`, in model order (by cut position)."""
    return sorted((m for m in model.modules() if isinstance(m, LinearPatch)), key=lambda p: p.start)


def unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, Patched) else module


def strip_patches(model: nn.Module) -> dict[int, LinearPatch]:
    """Remove every `Patched` wrapper in place (the model becomes the plain pruned model);
    returns the patches keyed by run start, ready for `insert_patches`."""
    dec = Decoder(model)
    out = {}
    for i, layer in enumerate(dec.layers):
        if isinstance(layer, Patched):
            out[layer.patch.start] = layer.patch
            dec.layers[i] = layer.inner
    if isinstance(dec.backbone.norm, Patched):
        out[dec.backbone.norm.patch.start] = dec.backbone.norm.patch
        dec.backbone.norm = dec.backbone.norm.inner
    return out
