"""Saving pruned (+ patched) models so that they load correctly everywhere, or refuse loudly.

`save_pruned(model, tokenizer, path)` picks one of three layouts (`lp_patch.json` "mode"):

* `plain`  - no patch: the pruned model's `save_pretrained` files; stock `from_pretrained` loads it.
* `folded` - every patch is a positive uniform scalar s (weight exactly s*I) and the architecture passes
  `fold_refusal`: the patch is folded into existing weights and the folder is a plain checkpoint of the
  base architecture (stock `from_pretrained`, no lp, no remote code). See `folded_state_dict`.
* `custom` - any other patch (diag, rotate, lstsq, distilled, ...): the folder's config gets
  `model_type = "lp_patched_<base>"`, `architectures = ["LpPatchedForCausalLM"]` and an `auto_map` to
  `modeling_lp.py` (copied from `lp/modeling_lp.py`), a subclass of the base architecture that applies
  each patch before the module it feeds. `from_pretrained(folder, trust_remote_code=True)` gives the lp
  model without lp installed; plain `from_pretrained(folder)` raises (transformers asks for
  `trust_remote_code=True`). Patch weights: `<module>.lp_patch.weight`, float32, in the safetensors.

Every save is verified before it replaces `path`: the folder is reloaded the way a user would load it
and its logits are compared with the in-memory model (`verify_saved`). A fold that does not reproduce
the model falls back to `custom`; any other mismatch is an error and nothing is written.
`load_pruned(path)` returns `(model, tokenizer)`: lp's own in-memory form (patches as `Patched`
wrappers, as after a run) for every layout.

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lp.models import Decoder, resolve_dtype
from lp.patch import LinearPatch, folded_linear, insert_patches, removed_runs, strip_patches
from lp.patches._mlp import site_name

log = logging.getLogger(__name__)

META_FILE = "lp_patch.json"
MODELING_FILE = "modeling_lp.py"
LEGACY_PATCH_FILE = "patches.safetensors"  # format 1 (plain config + separate patch file)
FORMAT = 2
# max |logit difference| / max |logit| allowed between the reloaded folder and the in-memory model
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------- folding
def scalar_of(patch: LinearPatch) -> float | None:
    """s if `patch.weight` is exactly s * I, else None."""
    w = patch.weight.detach()
    s = w[0, 0].item()
    return s if torch.equal(w, s * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)) else None


def is_diagonal(w: torch.Tensor) -> bool:
    return bool(torch.equal(w, torch.diag(torch.diagonal(w))))


def scalar_fold_refusal(model: nn.Module) -> str | None:
    """Why a positive scalar patch cannot be folded into `model`'s architecture (the module docstring's
    argument: every reader is a scale-invariant RMSNorm, every writer o_proj / down_proj); None if it can."""
    dec = Decoder(model)
    norms = [("model.norm", dec.norm)]
    for i, layer in enumerate(dec.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not (isinstance(getattr(attn, "o_proj", None), nn.Linear) and isinstance(getattr(mlp, "down_proj", None), nn.Linear)):
            return f"layer {i} ({type(layer).__name__}) does not write to the stream through self_attn.o_proj and mlp.down_proj"
        names = {n for n, m in layer.named_children() if "norm" in type(m).__name__.lower()}
        if names != {"input_layernorm", "post_attention_layernorm"}:
            return (f"layer {i} ({type(layer).__name__}) has norms {sorted(names)}; folding needs exactly the "
                    "pre-norms input_layernorm and post_attention_layernorm (no sandwich/post norms)")
        norms += [(f"layer {i}.{n}", getattr(layer, n)) for n in sorted(names)]
    for name, norm in norms:
        if "rmsnorm" not in type(norm).__name__.lower() or getattr(norm, "bias", None) is not None:
            return f"{name} is a {type(norm).__name__}; folding needs a scale-invariant RMSNorm without bias"
    return None


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

    def value(mod, pname):
        key = f"{names[id(mod)]}.{pname}"
        return key, new.get(key, getattr(mod, pname).detach().float())

    records = []
    factor = [1.0] * dec.num_layers
    for p in sorted(patches.values(), key=lambda p: p.start):
        if p.site == "mlp":
            k = mlp_layer_index(p, all_patches)
            layer = dec.layers[k]
            site = site_name(layer)
            if site == "mlp":  # the same arithmetic as the in-memory patch: lp.patch.folded_linear
                down = layer.mlp.down_proj
                w, b = folded_linear(down.weight.detach(), None if down.bias is None else down.bias.detach(),
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
    sd = dict(model.state_dict())
    for key, v in new.items():
        sd[key] = v.to(sd[key].dtype)
    return sd, records


def pruned_index(patch: LinearPatch, patches: dict[int, LinearPatch]) -> int:
    """Pruned index of the kept layer the patch feeds (= the pruned layer count for a cut at the end)."""
    return patch.end - sum(b - a for a, b in removed_runs(patches) if b <= patch.end)


def mlp_layer_index(patch: LinearPatch, patches: dict[int, LinearPatch]) -> int:
    """Pruned index of the last kept layer before the cut (dense start - 1): an mlp-site patch's layer."""
    return patch.start - 1 - sum(b - a for a, b in removed_runs(patches) if b <= patch.start - 1)


# --------------------------------------------------------------------------- save
def save_pruned(model: nn.Module, tokenizer, path, meta: dict | None = None, verify: bool = True,
                plain_only: bool = False) -> Path:
    """Save the pruned (+ patched) `model` to folder `path` (layouts: module docstring) and return `path`.
    Written into a temporary sibling folder, verified (`verify_saved`), then swapped in; an existing
    `path` must be an earlier `save_pruned` folder (or empty), anything else is refused. `plain_only`
    (`patch.foldable=true`): a model that would need the custom layout is an error, nothing written."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / META_FILE).is_file():
        raise FileExistsError(f"{path} exists and is not a save_pruned folder ({META_FILE} missing); not overwriting it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = _write_pruned(model, tokenizer, tmp, meta, fold=True)
        if plain_only and info["mode"] == "custom":
            raise RuntimeError(f"save_pruned: patch.foldable=true but the patches do not fold ({info['fold_refused']}); "
                               f"nothing written to {path}")
        if verify:
            err = verify_saved(tmp, model, info["mode"])
            if err is not None and info["mode"] == "folded":
                if plain_only:
                    raise RuntimeError(f"save_pruned: patch.foldable=true but the folded checkpoint does not "
                                       f"reproduce the model ({err}); nothing written to {path}")
                log.warning("export: the folded checkpoint does not reproduce the model (%s); saving the "
                            "custom-class layout instead", err)
                shutil.rmtree(tmp)
                tmp.mkdir()
                info = _write_pruned(model, tokenizer, tmp, meta, fold=False, why=f"fold failed verification: {err}")
                err = verify_saved(tmp, model, info["mode"])
            if err is not None:
                raise RuntimeError(f"save_pruned: the saved folder does not reproduce the in-memory model ({err}); "
                                   f"nothing written to {path}")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_pruned(model: nn.Module, tokenizer, path: Path, meta: dict | None, fold: bool, why: str | None = None) -> dict:
    patches = strip_patches(model)
    try:
        mlp = {a: p for a, p in patches.items() if p.site == "mlp"}
        for p in mlp.values():  # mlp-site patches exist only in folded form: no custom-class fallback
            if (err := mlp_fold_refusal(model, p, patches)) is not None:
                raise ValueError(f"save_pruned: cannot save the {p.kind} patch: {err}")
        refusal = (fold_refusal(model, patches) if fold else why) if patches else None
        if not patches:
            mode, state, records = "plain", None, []
        elif refusal is None:
            mode, (state, records) = "folded", folded_state_dict(model, patches)
        else:
            rest = {a: p for a, p in patches.items() if a not in mlp}
            state, records = folded_state_dict(model, mlp, patches) if mlp else (None, [])
            state, custom = _custom_state_dict(model, rest, patches, state)
            mode, records = "custom", sorted([*records, *custom], key=lambda r: r["start"])
        model.save_pretrained(path, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if mode == "custom":
            _write_custom_config(path, model, [r for r in records if "module" in r])
    finally:
        insert_patches(model, patches)
    ps = sorted(patches.values(), key=lambda p: p.start)
    info = {
        "format": FORMAT, "mode": mode, "fold_refused": None if mode != "custom" else refusal,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "base_model_type": model.config.model_type, "base_architecture": type(model).__name__,
        "num_layers_dense": ps[0].num_layers if ps else None,
        "removed_layers": sorted(i for a, b in removed_runs(patches) for i in range(a, b)),
        "cuts": [{**r, "scales": None if p.scales is None else p.scales.cpu().tolist()} for p, r in zip(ps, records, strict=True)],
        "meta": meta or {},
    }
    (path / META_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def _custom_state_dict(model: nn.Module, patches: dict[int, LinearPatch], all_patches: dict[int, LinearPatch],
                       state: dict | None = None) -> tuple[dict, list[dict]]:
    """Base weights under their own names (from `state` when given, e.g. with mlp-site patches folded)
    + `<module>.lp_patch.weight` (float32) per cut of `patches`; `all_patches` number the pruned layers."""
    dec = Decoder(model)
    names = {id(m): n for n, m in model.named_modules()}
    sd, records = dict(state if state is not None else model.state_dict()), []
    for p in sorted(patches.values(), key=lambda p: p.start):
        k = pruned_index(p, all_patches)
        module = names[id(dec.norm if k == dec.num_layers else dec.layers[k])]
        sd[f"{module}.lp_patch.weight"] = p.weight.detach().float().cpu().contiguous()
        records.append({"start": p.start, "end": p.end, "kind": p.kind, "module": module})
    return sd, records


def _write_custom_config(path: Path, model: nn.Module, records: list[dict]) -> None:
    base = model.config.model_type
    template = (Path(__file__).with_name("modeling_lp.py")).read_text()
    line = 'BASE_MODEL_TYPE = "llama"'
    if line not in template:
        raise RuntimeError(f"lp/modeling_lp.py lost its `{line}` line")
    (path / MODELING_FILE).write_text(template.replace(line, f"BASE_MODEL_TYPE = {base!r}"))
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(model_type=f"lp_patched_{base}", architectures=["LpPatchedForCausalLM"],
               auto_map={"AutoConfig": "modeling_lp.LpPatchedConfig",
                         "AutoModelForCausalLM": "modeling_lp.LpPatchedForCausalLM"},
               lp_patches=[{k: r[k] for k in ("module", "start", "end", "kind")} for r in records])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- verify / load
def verify_saved(path: Path, model: nn.Module, mode: str, tokens: int = 16) -> str | None:
    """Reload `path` as a user would (stock `from_pretrained`; `trust_remote_code=True` for `custom`)
    and compare logits on a fixed input with the in-memory `model`. None if they agree within
    `VERIFY_TOL` (relative to max |logit|), else a description of the mismatch."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    vocab = model.config.vocab_size
    ids = (torch.arange(2 * tokens).reshape(2, tokens) * 7919 % vocab).to(param.device)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=param.dtype, trust_remote_code=mode == "custom")
    back = back.to(param.device).eval()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = back(input_ids=ids, use_cache=False).logits.float()
    del back
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    tol = VERIFY_TOL.get(param.dtype, 2e-2)
    return None if rel <= tol else f"max |logit diff| / max |logit| = {rel:.3g} > {tol:g} ({mode} layout)"


def load_pruned(path, dtype=None, device=None):
    """Reload a `save_pruned` folder as `(model, tokenizer)`: the pruned model with its patches as
    `lp.patch.Patched` wrappers (custom layout; folded patches are already in the weights), and the
    tokenizer (None if none was saved). No original checkpoint and no remote code needed. `dtype`
    (torch.dtype or name) defaults to the saved model's dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a save_pruned folder: {META_FILE} missing")
    info = json.loads((path / META_FILE).read_text())
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype or resolve_dtype(info["dtype"])
    config = base_config(path) if info.get("mode") == "custom" else None
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, **({"config": config} if config is not None else {}))
    if config is not None:
        model = _load_custom(path, info, config, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if info.get("format", 1) == 1 and info["cuts"]:  # format 1: patches in a separate file
            from safetensors.torch import load_file

            weights = load_file(str(path / LEGACY_PATCH_FILE))
            insert_patches(model, {c["start"]: _patch(weights[f"patch.{c['start']}.weight"], c, info) for c in info["cuts"]})
    return (model if device is None else model.to(device)), tokenizer


def base_config(path: Path):
    """The base architecture's config of a custom-layout folder (its config.json minus lp's keys)."""
    from transformers import AutoConfig

    cfg = json.loads((path / "config.json").read_text())
    for key in ("auto_map", "lp_patches", "architectures"):
        cfg.pop(key, None)
    return AutoConfig.for_model(cfg.pop("model_type").removeprefix("lp_patched_"), **cfg)


def _patch(weight: torch.Tensor, cut: dict, info: dict) -> LinearPatch:
    s = None if cut.get("scales") is None else torch.tensor(cut["scales"])
    return LinearPatch(weight, cut["start"], cut["end"], info["num_layers_dense"], cut["kind"], s, info["removed_layers"])


def _load_custom(path: Path, info: dict, config, dtype) -> nn.Module:
    """The base architecture from a custom-layout folder (no remote code), patches re-inserted. The
    patch keys are the only checkpoint keys the base class does not know (checked, not just logged)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report would list the patch keys as "unexpected"
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    weights = _read_tensors(path, {f"{c['module']}.lp_patch.weight" for c in info["cuts"] if "module" in c})
    missing = set(loading["missing_keys"]) - _tied_keys(model)
    if set(loading["unexpected_keys"]) != set(weights) or missing or loading.get("mismatched_keys"):
        raise RuntimeError(f"{path}: unexpected checkpoint contents (missing {sorted(missing)}, unexpected "
                           f"{sorted(loading['unexpected_keys'])}, mismatched {loading.get('mismatched_keys')})")
    insert_patches(model, {c["start"]: _patch(weights[f"{c['module']}.lp_patch.weight"], c, info)
                           for c in info["cuts"] if "module" in c}, removed=info["removed_layers"])
    return model.eval()


def _tied_keys(model) -> set:
    return set(getattr(model, "all_tied_weights_keys", {}) or {})


def _read_tensors(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """`keys` from the folder's safetensors (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    out = {}
    for name in sorted(files):
        with safe_open(str(path / name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in keys & set(f.keys())})
    if set(out) != keys:
        raise RuntimeError(f"{path}: patch weights {sorted(keys - set(out))} missing from the checkpoint")
    return out
