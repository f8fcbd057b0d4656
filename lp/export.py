"""Saving and reloading pruned (+ patched) models: `save_pruned` / `load_pruned`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lp.models import resolve_dtype
from lp.patch import LinearPatch, insert_patches, strip_patches

PATCH_FILE = "patches.safetensors"
META_FILE = "lp_patch.json"


def save_pruned(model: nn.Module, tokenizer, path, meta: dict | None = None) -> Path:
    """Save the pruned (+ patched) model to folder `path`:
    `save_pretrained` files of the plain pruned model (reloads with `from_pretrained`),
    `patches.safetensors` (`patch.<start>.weight`, fp32) and `lp_patch.json`
    (dense layer count, removed layers, cuts, patch kind, scales, dtype, `meta`).
    Written into a temporary sibling folder that replaces `path` only when complete; an existing
    `path` must be an earlier `save_pruned` folder (or empty), anything else is refused."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / META_FILE).is_file():
        raise FileExistsError(f"{path} exists and is not a save_pruned folder ({META_FILE} missing); not overwriting it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_pruned(model, tokenizer, tmp, meta)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_pruned(model: nn.Module, tokenizer, path: Path, meta: dict | None) -> None:
    patches = strip_patches(model)
    try:
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    finally:
        insert_patches(model, patches)
    ps = sorted(patches.values(), key=lambda p: p.start)
    save_file({f"patch.{p.start}.weight": p.weight.detach().float().cpu().contiguous() for p in ps},
              str(path / PATCH_FILE))
    info = {
        "format": 1, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "num_layers_dense": ps[0].num_layers if ps else None,
        "removed_layers": sorted(i for p in ps for i in range(p.start, p.end)),
        "cuts": [{"start": p.start, "end": p.end, "kind": p.kind,
                  "scales": None if p.scales is None else p.scales.cpu().tolist()} for p in ps],
        "meta": meta or {},
    }
    (path / META_FILE).write_text(json.dumps(info, indent=2, default=str))


def load_pruned(path, dtype=None, device=None):
    """Reload a `save_pruned` folder: `(model with patches inserted, tokenizer)`, no original
    checkpoint needed. `dtype` (torch.dtype or name) defaults to the saved model's dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a save_pruned folder: {META_FILE} missing")
    info = json.loads(meta_path.read_text())
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    dtype = dtype or resolve_dtype(info["dtype"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    weights = load_file(str(path / PATCH_FILE))
    patches = {}
    for c in info["cuts"]:
        s = None if c.get("scales") is None else torch.tensor(c["scales"])
        patches[c["start"]] = LinearPatch(weights[f"patch.{c['start']}.weight"], c["start"], c["end"],
                                          info["num_layers_dense"], c["kind"], s)
    insert_patches(model, patches)
    if device is not None:
        model = model.to(device)
    return model, tokenizer
