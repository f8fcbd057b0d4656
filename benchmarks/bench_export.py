"""Saved SmolLM2 folders reloaded the way users load them, in a fresh process WITHOUT lp.

For the layers a run removed (its `result.json`), three folders are saved from the in-memory lp model:
`none` (plain), `scalar` (s*I with s = mean of the run's rotate scales, folded into the weights) and
`rotate` (the run's patch; custom class). A fresh interpreter in which `import lp` fails loads each
with stock `from_pretrained` (scalar, none) or `trust_remote_code=True` (rotate), computes PPL on the
first `--windows` WikiText-2 test windows and one greedy generation (KV cache); the same is measured
on the in-memory lp model. Also recorded: what plain `from_pretrained` does with the rotate folder,
and the PPL of the rotate folder's weights without the patch (what the format-1 folders silently
loaded as). Usage:
  python benchmarks/bench_export.py --run <output_dir of a patch=rotate patch.save=true run>
Writes benchmarks/results/export.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lp import data, load_pruned
from lp.evaluate.generate import greedy_sample
from lp.evaluate.ppl import perplexity
from lp.export import base_config, save_pruned
from lp.patch import LinearPatch, find_patches, insert_patches, strip_patches

p = argparse.ArgumentParser()
p.add_argument("--run", required=True)
p.add_argument("--windows", type=int, default=8)
p.add_argument("--seqlen", type=int, default=512)
p.add_argument("--prompt", default="The capital of France is")
p.add_argument("--tokens", type=int, default=24)
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared/data"))
result = json.loads((Path(args.run) / "result.json").read_text())
rotate_dir = Path(result["saved_model"])
model, tok = load_pruned(rotate_dir)
windows, _ = data.eval_windows(tok, "wikitext2", "test", args.seqlen, root, "auto", args.windows)
rotate = strip_patches(model)
s = float(torch.tensor([c for p_ in rotate.values() for c in p_.scales.tolist()]).mean())

FRESH = r"""
import json, sys, time
sys.modules["lp"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, how, windows, prompt, n = sys.argv[1], sys.argv[2], torch.load(sys.argv[3], weights_only=True), sys.argv[4], int(sys.argv[5])
kw = {"trust_remote_code": True} if how == "remote" else {}
t = time.perf_counter()
try:
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
except Exception as e:
    print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:400]})); raise SystemExit
load_s = time.perf_counter() - t
tok = AutoTokenizer.from_pretrained(path, **kw)
nll = 0.0
with torch.no_grad():
    for w in windows:
        out = model(input_ids=w[None], labels=w[None])
        nll += out.loss.float().item() * (w.numel() - 1)
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                         temperature=None, top_p=None, top_k=None)
print(json.dumps({"ok": True, "class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
                  "load_s": round(load_s, 2), "ppl": float(torch.tensor(nll / (windows.numel() - len(windows))).exp()),
                  "completion": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)}))
"""


def fresh(path, how, win_file):
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", FRESH, str(path), how, str(win_file), args.prompt, str(args.tokens)],
                         cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""  # after a possible y/N prompt
    return json.loads(last[last.index('{"ok"'):]) if '{"ok"' in last else {"ok": False, "error": out.stderr[-400:]}


rows = {}
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    torch.save(windows, tmp / "windows.pt")
    L = next(iter(rotate.values())).num_layers
    variants = {"none": {}, "scalar": {a: LinearPatch(s * torch.eye(r.weight.shape[0]), r.start, r.end, L, "scalar")
                                       for a, r in rotate.items()}, "rotate": rotate}
    for kind, patches in variants.items():
        insert_patches(model, patches)
        t = time.perf_counter()
        folder = save_pruned(model, tok, tmp / kind)
        save_s = time.perf_counter() - t
        meta = json.loads((folder / "lp_patch.json").read_text())
        mem = {"ppl": perplexity(model, windows, 1, progress=False),
               "completion": greedy_sample(model, tok, args.prompt, args.tokens)["completion"]}
        how = "remote" if meta["mode"] == "custom" else "stock"
        rows[kind] = {"mode": meta["mode"], "save_s": round(save_s, 2), "in_memory": mem, "fresh": fresh(folder, how, tmp / "windows.pt"),
                      "files": sorted(f.name for f in folder.iterdir())}
        if meta["mode"] == "custom":
            rows[kind]["fresh_plain_load"] = fresh(folder, "stock", tmp / "windows.pt")
            from transformers import AutoModelForCausalLM

            bare = AutoModelForCausalLM.from_pretrained(folder, config=base_config(folder)).eval()
            rows[kind]["weights_without_patch_ppl"] = perplexity(bare, windows, 1, progress=False)
        assert find_patches(model) or kind == "none"
        strip_patches(model)

res = {"run": args.run, "removed_layers": result["pruning"]["removed_layers"], "scalar_s": s, "windows": args.windows,
       "seqlen": args.seqlen, "prompt": args.prompt, "torch_threads": torch.get_num_threads(), "variants": rows}
out = REPO / "benchmarks/results/export.json"
out.write_text(json.dumps(res, indent=2))
for kind, r in rows.items():
    f = r["fresh"]
    print(f"{kind:7s} {r['mode']:7s} ppl lp={r['in_memory']['ppl']:.4f} fresh={f.get('ppl', float('nan')):.4f} "
          f"same_text={f.get('completion') == r['in_memory']['completion']} class={f.get('class')}")
print(json.dumps({k: r.get("fresh_plain_load") for k, r in rows.items() if "fresh_plain_load" in r}, indent=1))
