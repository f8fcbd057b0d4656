"""LinearPatch: one D x D matrix per cut, bridging the pruning interface.

For a removed contiguous run [a, b) of dense layers, the stream leaving the last kept layer
before the cut (= h_a of the pruned model) is multiplied by the patch's W before it enters the
first kept layer after it: x -> x W (row vectors). How W is fitted is the patch *kind*, one module
each in `lp.patches` (the vocabulary, defined once): `rotate` = the paper's P = H diag(s) H^T
(Chen et al., NeurIPS 2025, "A Simple Linear Patch Revives Layer-Pruned LLMs", H the orthonormal
Hadamard basis, s from calibration magnitudes of the *dense* model), `diag` = diag(s), `scalar` =
s I, `lstsq` = a least-squares map h_a -> h_b, `rotate_outlier`; `patch=auto` chooses per cut by
held-out NLL (`lp.verify`). `LinearPatch.kind` names the kind that built it.

Where the patch lives: `Patched` wraps the first kept module after the cut and multiplies its
first argument (the hidden states) by P, so the patch is a real module of the model (moves with
`.to()`, trains, works with KV-cache generation, independent of the layers' return type):
  * a cut in the middle, [a, b) with 0 < a and b < L: wraps dense layer b;
  * a cut at the start, a = 0: wraps dense layer b as well; the patch acts on the embedding output;
  * a cut at the end, b = L: wraps the final norm; the patch acts on the last kept layer's output
    before the final norm.
  * "mlp"-site kinds (`lstsq_mlp`, `rotate_mlp`; `PatchKind.site`): `OutputPatched` wraps the
    `mlp.down_proj` of the last kept layer before the cut, dense layer a - 1 (`lp.patches._mlp.site`),
    so that its output M becomes M P, computed through the folded weight P^T W exactly as the saved
    checkpoint computes it.
One patch per cut: removing several separate runs (e.g. [1, 2, 5] = runs [1, 3) and [5, 6))
gives each run its own patch, scaled from h_a and h_b measured on the dense model.
"""

from __future__ import annotations

import logging
from typing import TypedDict

import torch
from torch import nn

from lp import hadamard as hd
from lp import patches
from lp.devices import execution_device
from lp.models import Decoder
from lp.patches._mlp import OutputPatched, Wrapper, folded_linear  # noqa: F401  (re-exported)
from lp.patches._mlp import site as mlp_site
from lp.patches.base import FitSource
from lp.patches.rotate import rotated
from lp.patches.scalar import arch_refusal as scalar_arch_refusal

log = logging.getLogger(__name__)


class CutRecord(TypedDict):
    """One entry of `result["patch"]["cuts"]` (and one row of the tracker's `patch/cuts` table): the
    patch bridging the cut that removes dense layers [start, end). Every record has every key;
    a field a kind does not produce is None. `before`: the dense index of the module the patch
    feeds (`end`), or "norm" when the cut reaches the last layer. The rest is the kind's `Fit.info`:
    `scale` (scalar), `scale_min/median/max` (diag, rotate; rotate_outlier over its non-massive
    channels), `massive_channels` (rotate_outlier), `ridge` and `tokens` (lstsq, lstsq_mlp, rotate_mlp)."""

    start: int
    end: int
    before: int | str
    kind: str
    scale: float | None
    scale_min: float | None
    scale_median: float | None
    scale_max: float | None
    massive_channels: list[int] | None
    ridge: float | None
    tokens: int | None


CUT_FIELDS: tuple[str, ...] = tuple(CutRecord.__annotations__)


def cut_record(a: int, b: int, num_layers: int, kind: str, info: dict) -> CutRecord:
    """The `CutRecord` of kind `kind` at [a, b) of a `num_layers`-layer model from its `Fit.info`
    (a key outside `CutRecord` is a bug in the kind: raise rather than drop it)."""
    fixed = {"start": a, "end": b, "before": b if b < num_layers else "norm", "kind": kind}
    extra = set(info) - set(CUT_FIELDS) | set(info) & set(fixed)
    if extra:
        raise ValueError(f"patch kind {kind!r} reports {sorted(extra)}: not fields of lp.patch.CutRecord {CUT_FIELDS}")
    return CutRecord(**{**dict.fromkeys(CUT_FIELDS), **info, **fixed})


class LinearPatch(nn.Module):
    """x -> (x.float() @ weight).to(x.dtype); `weight` [D, D] is an fp32 trainable parameter
    (symmetric for rotate / diag / scalar; `scalar` has weight s I, `lstsq` a general matrix).

    `start`, `end` = the removed dense run [start, end) this patch bridges; `num_layers` = dense L;
    `scales` (optional, [D]) = the calibration scales it was built from (metadata for reports);
    `removed` (optional) = every dense layer the model loses, [start, end) one of its runs: lets
    placement and export number the pruned layers when other cuts carry no patch (`removed_runs`).
    """

    def __init__(self, weight: torch.Tensor, start: int, end: int, num_layers: int, kind: str = "rotate",
                 scales: torch.Tensor | None = None, removed=None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"LinearPatch weight must be square [D, D], got {tuple(weight.shape)}")
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"LinearPatch cut [{start}, {end}) is not a block of layers 0..{num_layers - 1}")
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.start, self.end, self.num_layers, self.kind = int(start), int(end), int(num_layers), kind
        self.scales = None if scales is None else scales.detach().float().cpu().clone()  # metadata, not a buffer
        self.removed = None if removed is None else tuple(sorted(int(i) for i in removed))
        if self.removed is not None and (self.start, self.end) not in runs_of(self.removed):
            raise ValueError(f"LinearPatch cut [{start}, {end}) is not a run of the removed layers {list(self.removed)}")
        if self.site == "mlp" and start == 0:
            raise ValueError(f"LinearPatch kind={kind}: an mlp-site patch needs a kept layer before the cut, got [0, {end})")

    @property
    def site(self) -> str:
        """Where x -> x W acts (`lp.patches.base.PatchKind.site`): "input" or "mlp"."""
        k = patches.KINDS.get(self.kind)
        return k.site if k is not None else "input"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32)  # no-op unless the model was cast/split
        return (x.float() @ w).to(x.dtype)

    def extra_repr(self) -> str:
        return f"cut=[{self.start}, {self.end}), dim={self.weight.shape[0]}, kind={self.kind}"


class Patched(Wrapper):
    """`inner` (a decoder layer, or the final norm for a cut at the end) with `patch` applied to its
    first argument (hidden_states). Other args/kwargs pass through unchanged; attribute lookups
    that fail on the wrapper (e.g. `attention_type`, `layer_idx`) are forwarded to `inner`."""

    def forward(self, *args, **kwargs):
        if args:
            args = (self.patch(args[0]), *args[1:])
        else:
            kwargs["hidden_states"] = self.patch(kwargs["hidden_states"])
        return self.inner(*args, **kwargs)


# --------------------------------------------------------------------------- construction
def check_patch(patch_cfg, hidden_size: int) -> None:
    """Validate `patch.*` (kind, auto candidates, verify list, each kind's settings) against the
    model's hidden size before any weights load."""
    kind = patch_cfg.kind
    patches.check_name(kind)
    for key in ("candidates", "verify"):
        value = patch_cfg.get(key)
        if value is None:
            continue
        if isinstance(value, str) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"patch.{key}={value!r} must be a list of patch kinds, e.g. [none, diag, rotate]")
        for k in value:
            patches.check_name(k, f"patch.{key} entry", allow_choice=False)
    basis = hd.Basis.of(patch_cfg)
    seed = basis.fallback_seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"patch.hadamard_fallback_seed={seed!r} must be null or an integer")
    if kind != "none":  # checks the basis name and its seed
        basis.spec(hidden_size)
    if kind == "auto" and not patch_cfg.get("candidates"):
        raise ValueError("patch=auto needs patch.candidates, a non-empty list of kinds to choose from")
    foldable = patch_cfg.get("foldable", False)
    if not isinstance(foldable, bool):
        raise ValueError(f"patch.foldable={foldable!r} must be true or false")
    if foldable and kind != "auto" and not patches.KINDS[kind].foldable:
        raise ValueError(f"patch.foldable=true but patch={kind} does not fold into the base weights; "
                         f"foldable kinds: {foldable_kinds()} (or patch=auto, which then chooses among them)")
    if foldable and kind == "auto" and not own_kinds(patch_cfg):
        raise ValueError(f"patch.foldable=true leaves none of patch.candidates={list(patch_cfg.candidates)}; "
                         f"foldable kinds: {foldable_kinds()}")
    for k in own_kinds(patch_cfg):
        patches.get(k).check(patch_cfg, hidden_size)


def foldable_kinds() -> list[str]:
    return [k for k, v in patches.KINDS.items() if v.foldable]


def own_kinds(patch_cfg) -> list[str]:
    """The configured kind, or auto's candidates (only the foldable ones with `patch.foldable=true`)."""
    if patch_cfg.kind != "auto":
        return [patch_cfg.kind]
    cands = list(patch_cfg.get("candidates") or [])
    return [k for k in cands if patches.KINDS[k].foldable] if patch_cfg.get("foldable", False) else cands


def cut_refusal(kind: str, model: nn.Module, runs, foldable: bool = False) -> str | None:
    """Why `kind` cannot bridge the cuts `runs` of the dense `model` (`PatchKind.check_cuts`), or,
    with `foldable`, cannot be folded there into a plain checkpoint; None when it can."""
    try:
        patches.KINDS[kind].check_cuts(model, runs)
    except ValueError as e:
        return str(e)
    if foldable and kind == "scalar":
        why = scalar_arch_refusal(model)
        return None if why is None else f"patch=scalar cannot fold into this architecture: {why}"
    return None


def kinds_to_fit(patch_cfg, hidden_size: int, model: nn.Module | None = None, runs=None) -> list[str]:
    """Kinds whose patches a run builds: `own_kinds`, then the `patch.verify` kinds that can be
    built for this hidden size (e.g. rotate is skipped without a Hadamard basis), without
    duplicates and without `none`. With `model` and `runs`: the configured kind that cannot bridge
    (or, with `patch.foldable`, fold at) these cuts is a ValueError before any fitting; auto
    candidates and verify kinds that cannot are skipped with a log line (e.g. `lstsq_mlp` when
    layer 0 is removed)."""
    foldable = patch_cfg.get("foldable", False)
    out = []
    for k in own_kinds(patch_cfg):
        why = cut_refusal(k, model, runs, foldable) if model is not None and k != "none" else None
        if why is not None and patch_cfg.kind != "auto":
            raise ValueError(why)
        if why is not None:
            log.warning("patch=auto: candidate %s left out (%s)", k, why)
        elif k != "none":
            out.append(k)
    for k in patch_cfg.get("verify") or []:
        if k != "none" and k not in out:
            try:
                patches.get(k).check(patch_cfg, hidden_size)
                if model is not None and (why := cut_refusal(k, model, runs)) is not None:
                    raise ValueError(why)
            except ValueError as e:
                log.info("patch.verify: skipping %s (%s)", k, e)
                continue
            out.append(k)
    return out


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
    """P [D, D] float32 from scales: `rotate`: R diag(s) R^T (float64, exactly symmetrised); `diag`: diag(s)."""
    if kind == "diag":
        return torch.diag(scales.double()).float()
    if kind != "rotate":
        raise ValueError(f"patch_matrix: kind={kind!r}; choose one of ['diag', 'rotate']")
    return rotated(rotation, scales).float()


def fit_patches(ctx, removed, patch_cfg, kinds: list[str]) -> tuple[dict, dict]:
    """Fit every kind in `kinds` at every contiguous run of `removed` (dense indices) from the dense
    model in `ctx` (calibration statistics and, for kinds that need them, one pass over the
    calibration activations shared by all such kinds). Returns `({kind: {a: LinearPatch or None}},
    {kind: [per-cut info]})`, patches keyed by each run's first removed layer a (None = no patch)."""
    dec = Decoder(ctx.model)
    L = dec.num_layers
    runs = runs_of(removed)
    if not runs:
        raise ValueError("fit_patches: no layers removed, nothing to patch")
    source = FitSource(ctx, patch_cfg)
    chosen = [patches.get(k) for k in kinds]
    for kind in chosen:  # before the activation pass
        kind.check_cuts(ctx.model, runs)
    source.collect(chosen, runs)  # one activation pass for every kind that needs one
    fitted, infos = {}, {}
    for kind in chosen:
        fitted[kind.name], infos[kind.name] = {}, []
        for a, b in runs:
            f = kind.fit(source, a, b)
            p = None if f.weight is None else LinearPatch(f.weight.float(), a, b, L, kind.name, f.scales,
                                                          removed)
            fitted[kind.name][a] = p
            infos[kind.name].append(cut_record(a, b, L, kind.name, f.info))
    cost = {"calibration": source._stats.cost if source._stats is not None else None,
            "activation_pass_seconds": round(source.collect_seconds, 3)}
    return fitted, {"cuts": infos, "cost": cost, "rotation": source.rotation_spec(),
                    "hadamard": source.basis.kind, "hadamard_seed": source.basis.seed}


def build_patches(ctx, removed, patch_cfg) -> tuple[dict[int, LinearPatch], dict]:
    """One LinearPatch per contiguous run of `removed` for the single kind `patch_cfg.kind`.
    Returns `(patches keyed by each run's first removed layer a, info for result.json)`.
    Call before `drop_layers`, insert after it."""
    kind = patch_cfg.kind
    if kind not in patches.KINDS or kind == "none":
        raise ValueError(f"build_patches: patch.kind={kind!r}; needs one of {[k for k in patches.KINDS if k != 'none']}")
    check_patch(patch_cfg, Decoder(ctx.model).hidden_size)
    fitted, info = fit_patches(ctx, removed, patch_cfg, [kind])
    ps = {a: p for a, p in fitted[kind].items() if p is not None}
    return ps, patch_info(kind, ps, info["cuts"][kind], info)


def patch_info(kind: str, ps: dict, cuts: list[dict], fit_info: dict) -> dict:
    """The `result["patch"]` record of the patches `ps` actually inserted."""
    uses_rotation = any(patches.KINDS[p.kind].uses_rotation for p in ps.values())
    return {"kind": kind, "rotation": fit_info["rotation"] if uses_rotation else None,
            "hadamard": fit_info["hadamard"] if uses_rotation else None,
            "hadamard_seed": fit_info["hadamard_seed"] if uses_rotation else None, "cuts": cuts,
            "num_patches": len(ps), "params": sum(p.weight.numel() for p in ps.values()),
            "calibration": fit_info["cost"]["calibration"],
            "activation_pass_seconds": fit_info["cost"]["activation_pass_seconds"]}


# --------------------------------------------------------------------------- placement
def insert_patches(model: nn.Module, patches: dict[int, LinearPatch], removed=None) -> nn.Module:
    """Wrap the first kept module after each cut in the *pruned* model (call after `drop_layers`).

    Dense run [a, b) -> pruned index b - (#removed layers below b) of the next kept layer, or the
    final norm when b = L; an mlp-site patch wraps the MLP of the kept layer a - 1. `removed`: every
    removed dense layer (default: `removed_runs` of the patches; needed when some cuts have no patch and
    the patches do not know it). Checks that the model's layer count is L - (#removed).
    """
    if not patches:
        return model
    dec = Decoder(model)
    ps = sorted(patches.values(), key=lambda p: p.start)
    L = ps[0].num_layers
    runs = [(p.start, p.end) for p in ps]
    if any(p.num_layers != L for p in ps) or any(b > a2 for (_, b), (a2, _) in zip(runs, runs[1:], strict=False)):
        raise ValueError(f"patches overlap or come from different models: cuts {runs}")
    all_runs = runs_of(removed) if removed is not None else removed_runs(patches)
    if not set(runs) <= set(all_runs):
        raise ValueError(f"insert_patches: cuts {runs} are not runs of the removed layers {all_runs}")
    runs = all_runs
    removed = sum(b - a for a, b in runs)
    if dec.num_layers != L - removed:
        raise ValueError(f"insert_patches: the model has {dec.num_layers} layers but cuts {runs} of a "
                         f"{L}-layer model leave {L - removed}; call it after drop_layers")
    if find_patches(model):
        raise ValueError("insert_patches: the model already holds patches (strip_patches first)")
    for p in ps:
        if p.site == "mlp":  # the last kept layer before the cut, dense index start - 1
            if p.start - 1 in {i for a, b in runs for i in range(a, b)}:
                raise ValueError(f"insert_patches: the {p.kind} patch at [{p.start}, {p.end}) needs layer {p.start - 1} kept")
            layer = unwrap(dec.layers[p.start - 1 - sum(b - a for a, b in runs if b <= p.start - 1)])
            parent, name = mlp_site(layer)
            setattr(parent, name, OutputPatched(getattr(parent, name), _on_device_of(p, getattr(parent, name))))
        elif p.end == L:
            dec.set_norm(Patched(dec.norm, _on_device_of(p, dec.norm)))
        else:
            idx = p.end - sum(b - a for a, b in runs if b <= p.end)
            dec.layers[idx] = Patched(dec.layers[idx], _on_device_of(p, dec.layers[idx]))
    return model


def removed_runs(patches: dict[int, LinearPatch]) -> list[tuple[int, int]]:
    """Every removed run of the model the patches belong to: from `LinearPatch.removed` when set
    (cuts without a patch included), else the patches' own cuts."""
    removed = next((p.removed for p in patches.values() if p.removed is not None), None)
    return runs_of(removed) if removed is not None else sorted((p.start, p.end) for p in patches.values())


def _on_device_of(patch: LinearPatch, module: nn.Module) -> LinearPatch:
    """The patch on the execution device of the module it feeds (`lp.devices.execution_device`: the
    accelerate hook's device for a dispatched or offloaded module, never `meta`)."""
    return patch.to(execution_device(module))


def find_patches(model: nn.Module) -> list[LinearPatch]:
    """The LinearPatch modules inside `model`, in model order (by cut position)."""
    return sorted((m for m in model.modules() if isinstance(m, LinearPatch)), key=lambda p: p.start)


def unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, (Patched, OutputPatched)) else module


def strip_patches(model: nn.Module) -> dict[int, LinearPatch]:
    """Remove every `Patched` wrapper in place (the model becomes the plain pruned model);
    returns the patches keyed by run start, ready for `insert_patches`."""
    dec = Decoder(model)
    out = {}
    for i, layer in enumerate(dec.layers):
        if isinstance(layer, Patched):
            out[layer.patch.start] = layer.patch
            dec.layers[i] = layer = layer.inner
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, OutputPatched):
                    out[child.patch.start] = child.patch
                    setattr(parent, name, child.inner)
    if isinstance(dec.norm, Patched):
        out[dec.norm.patch.start] = dec.norm.patch
        dec.set_norm(dec.norm.inner)
    return out
