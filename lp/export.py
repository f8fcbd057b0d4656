"""Saving pruned (+ patched) models so that they load correctly everywhere, or refuse loudly.

`save_pruned(model, tokenizer, path)` picks one of three layouts (`lp_patch.json` "mode"):

* `plain`  - no patch: the pruned model's `save_pretrained` files; stock `from_pretrained` loads it.
* `folded` - every patch folds into existing weights (`lp.fold`: a positive uniform scalar s*I on an
  architecture that passes `fold_refusal`; lstsq_mlp / rotate_mlp, T on a layer's MLP output, into its
  down_proj): the folder is a plain checkpoint of the base architecture (stock `from_pretrained`, no lp,
  no remote code). See `folded_state_dict`.
* `custom` - any other patch (diag, rotate, lstsq, distilled, ...): mlp-site patches are folded as above
  (they have no other form) and the folder's config gets
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

Why each fold is exact, and where it is refused: `lp.fold`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lp.devices import input_device, is_offloaded, model_dtype, state_dict
from lp.fold import fold_refusal, folded_state_dict, mlp_fold_refusal, pruned_index, scalar_of  # noqa: F401
from lp.models import Decoder, resolve_dtype
from lp.patch import LinearPatch, insert_patches, removed_runs, strip_patches

log = logging.getLogger(__name__)

META_FILE = "lp_patch.json"
MODELING_FILE = "modeling_lp.py"
LEGACY_PATCH_FILE = "patches.safetensors"  # format 1 (plain config + separate patch file)
FORMAT = 2
# max |logit difference| / max |logit| allowed between the reloaded folder and the in-memory model
VERIFY_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------- save
def save_pruned(model: nn.Module, tokenizer, path, meta: dict | None = None, verify: bool = True,
                plain_only: bool = False) -> Path:
    """Save the pruned (+ patched) `model` to folder `path` (layouts: module docstring) and return `path`.
    Written into a temporary sibling folder, verified (`verify_saved`), then swapped in; an existing
    `path` must be an earlier `save_pruned` folder (or empty), anything else is refused. `plain_only`
    (`patch.foldable=true`): a model that would need the custom layout is an error, nothing written;
    a folded save is adopted in memory (`adopt_fold`: the model becomes the folded checkpoint, so what
    is evaluated afterwards is what was shipped; `lp_patch.json` "fold_deviation" = how far that moved
    the logits: 0 for lstsq_mlp / rotate_mlp, the RMSNorm eps effect for a scalar)."""
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
        if plain_only and info["mode"] == "folded":
            info["fold_deviation"] = adopt_fold(model)
            (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=str))
        if verify:
            err = verify_saved(tmp, model, info["mode"])
            if err is not None and info["mode"] == "folded" and not plain_only:
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
        model.save_pretrained(path, state_dict=state if state is not None or not is_offloaded(model) else state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if mode == "custom":
            _write_custom_config(path, model, [r for r in records if "module" in r])
    finally:
        insert_patches(model, patches)
    ps = sorted(patches.values(), key=lambda p: p.start)
    info = {
        "format": FORMAT, "mode": mode, "fold_refused": None if mode != "custom" else refusal,
        "dtype": str(model_dtype(model)).removeprefix("torch."),
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
    sd, records = dict(state if state is not None else state_dict(model)), []
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


def adopt_fold(model: nn.Module) -> float:
    """Fold the patches of `model` into its own weights in place (`folded_state_dict`; they must fold)
    and remove them; returns max |logit change| / max |logit| on `probe_ids` (0 when exact)."""
    ids = probe_ids(model)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        patches = strip_patches(model)
        model.load_state_dict(folded_state_dict(model, patches)[0])
        got = model(input_ids=ids, use_cache=False).logits.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------- verify / load
def probe_ids(model: nn.Module, tokens: int = 16) -> torch.Tensor:
    """Fixed token ids [2, tokens] on the model's device: the input save checks compare logits on."""
    ids = torch.arange(2 * tokens).reshape(2, tokens) * 7919 % model.config.vocab_size
    return ids.to(next(model.parameters()).device)


def verify_saved(path: Path, model: nn.Module, mode: str) -> str | None:
    """Reload `path` as a user would (stock `from_pretrained`; `trust_remote_code=True` for `custom`)
    and compare logits on a fixed input with the in-memory `model`. None if they agree within
    `VERIFY_TOL` (relative to max |logit|), else a description of the mismatch."""
    from transformers import AutoModelForCausalLM

    device, dtype = input_device(model), model_dtype(model)
    ids = probe_ids(model)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=mode == "custom")
    back = back.to(device).eval()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = back(input_ids=ids, use_cache=False).logits.float()
    del back
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    tol = VERIFY_TOL.get(dtype, 2e-2)
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
