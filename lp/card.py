"""Model card (`README.md` with Hugging Face front-matter) for a folder written by `lp.export.save_pruned`.

`write_card(folder, result)` reads the run's `result` dict (as in result.json) and the folder's
`lp_patch.json`; call it again after evaluation so the card carries the run's metrics.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch

from lp.export import META_FILE, VERIFY_TOL, save_pruned

log = logging.getLogger(__name__)

HOW_TO_LOAD = {
    "plain": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```
A plain checkpoint of the base architecture: no lp and no remote code needed.""",
    "folded": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```
Every patch is folded into existing weights (see "Folded patches" above), so this is a plain checkpoint
of the base architecture with fewer layers: no lp and no remote code needed.""",
    "custom": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{path}", trust_remote_code=True)
```
The patch is not foldable into the base weights, so the folder ships `modeling_lp.py` (a subclass of
`{base}` that applies each patch before the layer it feeds; torch + transformers only, no lp).
Without `trust_remote_code=True`, `from_pretrained` refuses this folder instead of silently loading
the base architecture without the patch. With lp installed, `lp.load_pruned("{path}")` returns
`(model, tokenizer)` in lp's own form (no remote code).""",
}


def fold_why(cut: dict) -> str:
    """Why the folded patch of one `lp_patch.json` cut reproduces the model (the card's column)."""
    if cut["kind"] == "scalar":
        return ("P = s I with s > 0, and every reader of the residual stream is a scale-invariant RMSNorm: "
                "dividing every later writer (o_proj, down_proj) by s gives the same normalised inputs "
                "(exact up to the norms' eps)")
    if cut["folded_into"].endswith("(diagonal T)"):
        return ("T is diagonal and multiplies the output x_hat (c + w) of the layer's post-feedforward norm: "
                "its weight becomes (c + w) T - c (exact up to float rounding)")
    return (f"{cut['kind']} multiplies the MLP output y = x W^T (+ b) of the last kept layer before the cut by "
            "T, and y T = x (T^T W)^T (+ b T): one linear map, stored as that down_proj's weight (the "
            "in-memory model computed it the same way: identical logits)")


def save_with_card(model, tokenizer, path, result: dict, width=None) -> tuple[str, dict | None]:
    """`save_pruned` + card, for a run; returns (folder, `result["export"]`: layout, why not folded).
    A scalar patch that had to be saved as custom code is a loud warning in `result["warnings"]`.
    Width-pruned models (`width`: a `lp.width.WidthPlan`) are saved by the plan, without a card: (folder, None)."""
    meta = {"name": result["name"], "removed_layers": result["pruning"]["removed_layers"], "patch": result["patch"]}
    if width is not None:
        return str(width.save(model, tokenizer, path, meta)), None
    plain_only = bool(((result.get("config") or {}).get("patch") or {}).get("foldable", False))
    folder = save_pruned(model, tokenizer, path, meta, plain_only=plain_only)
    info = json.loads((folder / META_FILE).read_text())
    if info["mode"] == "custom" and all(c.get("kind") == "scalar" for c in info["cuts"]):
        msg = f"scalar patch not folded ({info['fold_refused']}): the saved model needs trust_remote_code=True"
        log.warning(msg)
        result.setdefault("warnings", []).append(msg)
    export = {"mode": info["mode"], "fold_refused": info["fold_refused"]}
    if "fold_deviation" in info:  # patch.foldable=true: the folded model is now the in-memory one
        export["fold_deviation"] = info["fold_deviation"]
        msg = (f"patch.foldable=true: the patches are folded into the weights in memory too (the model evaluated is "
               f"the saved checkpoint); logits moved by {info['fold_deviation']:.3g} of max |logit|")
        if info["fold_deviation"] > VERIFY_TOL.get(getattr(torch, info["dtype"]), 2e-2):
            log.warning("!!! %s", msg)
            result.setdefault("warnings", []).append(msg)
        else:
            log.info(msg)
    write_card(folder, result)
    return str(folder), export


def write_card(folder, result: dict) -> Path:
    """Write `<folder>/README.md` from the run's `result` and the folder's `lp_patch.json`; returns its path."""
    folder = Path(folder)
    info = json.loads((folder / META_FILE).read_text())
    text = front_matter(result) + body(folder, result, info)
    path = folder / "README.md"
    tmp = folder / f".README.md.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def base_model_id(model_cfg: dict) -> str | None:
    """The base model's hub id: `model.base_model`, else `model.pretrained` when it is a hub id."""
    if model_cfg.get("base_model"):
        return model_cfg["base_model"]
    src = model_cfg.get("pretrained")
    return src if src and not src.startswith((".", "/", "~")) and src.count("/") == 1 else None


def front_matter(result: dict) -> str:
    model_cfg = (result.get("config") or {}).get("model") or {}
    patch = (result.get("patch") or {}).get("kind", "none")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    base = base_model_id(model_cfg)
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- lp", "- layer-pruning", f"- patch-{patch}"]
    if patch != "none":
        lines.append("- linearpatch")
    return "\n".join(lines) + "\n---\n\n"


def body(folder: Path, result: dict, info: dict) -> str:
    p = result.get("pruning") or {}
    patch = result.get("patch") or {}
    model = result.get("model") or {}
    model_cfg = (result.get("config") or {}).get("model") or {}
    source = base_model_id(model_cfg) or model_cfg.get("pretrained") or _source(model_cfg)
    rows = [
        ("Base model", f"{model_cfg.get('name', '?')} ({source})"),
        ("Layers", f"{model.get('num_layers', info.get('num_layers_dense'))} -> {p.get('num_layers_after', '?')}"),
        ("Removed layers (dense indices)", str(p.get("removed_layers", info.get("removed_layers")))),
        ("Selection", f"{p.get('method', '?')}" + (f" ({p['label']})" if p.get("label") else "")),
        ("Parameters", _params(p)),
        ("Patch", _patch_text(patch, info)),
        ("Saved as", f"`{info['mode']}` layout, {info['dtype']}"
         + (f" (not folded: {info['fold_refused']})" if info.get("fold_refused") else "")),
        ("Calibration", _calibration(result)),
        ("Distillation", _distill(result)),
    ]
    out = [f"# {result.get('name') or folder.name}", "",
           "Layer-pruned with lp (layer pruning of LLMs with LinearPatch).", "",
           "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    folded = [c for c in info.get("cuts", []) if c.get("folded_into")]
    if folded:
        out += ["## Folded patches", "", "| cut | kind | folded into | why it is exact |", "|---|---|---|---|",
                *[f"| [{c['start']}, {c['end']}) | {c['kind']} | {c['folded_into']} | {fold_why(c)} |"
                  for c in folded], ""]
    out += ["## Metrics", "", _metrics(result), ""]
    gen = result.get("generation")
    if gen:
        out += ["## Greedy sample", "", f"Prompt: `{gen['prompt']}`", "", "```", gen["prompt"] + gen["completion"], "```", ""]
    out += ["## How to load", "", HOW_TO_LOAD[info["mode"]].format(path=str(folder), base=info.get("base_architecture")), "",
            "## Provenance", "", _provenance(result), ""]
    return "\n".join(out)


def _source(model_cfg: dict) -> str:
    if model_cfg.get("gguf"):
        return "GGUF {file} from the Python package {package}".format(**model_cfg["gguf"])
    if model_cfg.get("tiny"):
        return f"random-weight tiny {model_cfg['tiny'].get('arch', 'llama')} model built in-process"
    return "unknown source"


def _params(p: dict) -> str:
    if "params_pruned" not in p:
        return "?"
    text = f"{p['params_pruned']:,} of {p['params_dense']:,} ({100 * p['pruned_ratio']:.2f}% removed)"
    return text + (f", patch {p['params_patch']:,}" if p.get("params_patch") else "")


def _patch_text(patch: dict, info: dict) -> str:
    kind = patch.get("kind", "none")
    if kind == "none":
        return "none"
    basis = f", basis {patch['hadamard']}" if patch.get("hadamard") else ""
    seed = f" (seed {patch['hadamard_seed']})" if patch.get("hadamard_seed") is not None else ""
    cuts = ", ".join(f"[{c['start']}, {c['end']}) {c['kind']}" for c in info.get("cuts", []))
    return f"{kind}{basis}{seed}; one D x D patch per cut: {cuts}"


def _calibration(result: dict) -> str:
    cal = (result.get("data") or {}).get("calibration")
    if not cal:
        return "none"
    keys = ("corpus", "split", "nsamples", "seqlen", "seed")
    return ", ".join(f"{k}={cal[k]}" for k in keys if k in cal)


def _distill(result: dict) -> str:
    d = result.get("distill")
    if not d:
        return "none (training-free)"
    if d.get("skipped"):
        return f"none (training-free): skipped, {d['skipped']}"
    return f"output-KL, {d.get('steps', '?')} steps"


def _metrics(result: dict) -> str:
    metrics = {k: v for k, v in (result.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if not metrics:
        return "Not evaluated."
    lines = ["| metric | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in metrics.items()]]
    ppl = {k: v for k, v in ((result.get("data") or {}).items()) if k.startswith("ppl/") and isinstance(v, dict)}
    if ppl:
        lines += ["", "PPL windows: " + "; ".join(
            f"{k}: {v.get('windows')} x {v.get('seqlen')} tokens ({v.get('split', '')})" for k, v in ppl.items())]
    warnings = result.get("warnings") or []
    if warnings:
        lines += ["", "**Warnings of this run:**", *[f"- {w}" for w in warnings]]
    return "\n".join(lines)


def _provenance(result: dict) -> str:
    try:
        version = importlib.metadata.version("lp")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    v = result.get("versions") or {}
    commit = result.get("git_commit") or "unknown"
    dirty = " (uncommitted changes)" if result.get("git_dirty") else ""
    overrides = " ".join(result.get("overrides") or [])
    return "\n".join([f"- lp {version}, commit `{commit}`{dirty}",
                      f"- torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}",
                      f"- run: `python run.py {overrides}`".rstrip()])
