"""Foldable patches on the embedded model: every kind on the same cut, which kinds fold into a plain
checkpoint, the cost of each fit, and the check that a folded save reloads with stock
`from_pretrained` to the in-memory model's logits.

SmolLM2-135M bf16, `pruner=<--pruner>` at each n, `calib=<--calib>` (its held-out windows from the
reserved tail). For each n: the block is selected once; each kind is fitted alone on the dense model
(`lp.patch.fit_patches`, timed per kind: calibration statistics come from the disk cache, so the
seconds are the kind's own work, i.e. its activation pass for lstsq / lstsq_mlp / rotate_mlp); the
held-out NLL is `lp.verify.Heldout` as a run records it; `auto` and `auto foldable` are what
`lp.run.make_patches` does (`lp.candidates.fit_candidates`, `lp.verify.verify_patches`, `lp.candidates.ship`)
with `patch=auto` (default candidates) and `patch.foldable=true` (timed: what they add to a run after selection); WikiText-2 / PTB PPL on one pruned copy with the patches swapped in.
Fold check: `lp.export.save_pruned` of that copy (layout `plain`/`folded` = a stock checkpoint), and for
those a stock `AutoModelForCausalLM.from_pretrained` in this process, logits compared with the
in-memory model on 2 x 64 tokens (`equal` = bit for bit; `rel` = max |diff| / max |logit|).
No distillation (`distill=quick` rows are not part of this run).

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_foldable.py [--n 5] [--pruner linearpatch] [--calib quick]
         [--ppl-windows 16] [--out foldable]
Writes benchmarks/results/<NAME>.json and .md.
"""

import argparse
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lp import models, verify
from lp.candidates import fit_candidates, ship
from lp.export import save_pruned
from lp.patch import fit_patches, insert_patches, runs_of, strip_patches
from lp.run import build, eval_ppl, prune_context

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, nargs="+", default=[5])
p.add_argument("--pruner", default="linearpatch")
p.add_argument("--calib", default="quick")
p.add_argument("--ppl-windows", type=int, default=16)
p.add_argument("--ppl-seqlen", type=int, default=512)
p.add_argument("--kinds", nargs="+", default=["none", "scalar", "diag", "rotate", "lstsq", "lstsq_mlp", "rotate_mlp"])
p.add_argument("--out", default="foldable")
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
    cfg = compose("config", overrides=[
        "model=smollm2_135m", f"calib={args.calib}", "patch=auto", f"data.root={root}", "eval=quick",
        f"pruner={args.pruner}", "eval.ppl.datasets=[wikitext2,ptb]", f"eval.ppl.max_windows={args.ppl_windows}",
        f"eval.ppl.seqlen={args.ppl_seqlen}", "eval.ppl.progress=false", "runtime.threads=1"])
model, tok = models.load_model(cfg.model)
ctx = prune_context(cfg, model, tok)
held = verify.Heldout(model, verify.heldout_windows(cfg, tok), cfg.calib.batch_size)
ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
dense_ppl, _ = eval_ppl(cfg, model, tok)
out = {"settings": vars(args), "dtype": str(next(model.parameters()).dtype),
       "dense": {"nll": held.nll([]), **dense_ppl}, "rows": []}


def fold_check(pruned) -> dict:
    """Save `pruned` (patches in place) and, when the layout is a stock checkpoint, reload it with stock
    from_pretrained and compare logits with the in-memory model."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = save_pruned(pruned, None, Path(tmp) / "m")
        mode = json.loads((path / "lp_patch.json").read_text())["mode"]
        cfg_json = json.loads((path / "config.json").read_text())
        row = {"layout": mode, "plain_checkpoint": mode in ("plain", "folded") and "auto_map" not in cfg_json
               and not (path / "modeling_lp.py").exists(), "num_hidden_layers": cfg_json["num_hidden_layers"]}
        if row["plain_checkpoint"]:
            back = AutoModelForCausalLM.from_pretrained(path, dtype=next(pruned.parameters()).dtype).eval()
            with torch.no_grad():
                want, got = pruned(input_ids=ids).logits.float(), back(input_ids=ids).logits.float()
            row.update(logits_equal=bool(torch.equal(got, want)),
                       logits_rel=((got - want).abs().max() / want.abs().max()).item())
    return row


for n in args.n:
    sel = build(OmegaConf.merge(cfg.pruner, {"n": n})).select(ctx)
    fitted, seconds = {"none": {a: None for a, _ in runs_of(sel.removed)}}, {"none": 0.0}
    for kind in [k for k in args.kinds if k != "none"]:
        t0 = time.perf_counter()
        f, _ = fit_patches(ctx, sel.removed, OmegaConf.merge(cfg.patch, {"kind": kind}), [kind])
        seconds[kind] = time.perf_counter() - t0
        fitted[kind] = f[kind]
    for label, foldable in (("auto", False), ("auto foldable", True)):
        t0 = time.perf_counter()
        cands = fit_candidates(ctx, sel.removed, OmegaConf.merge(cfg.patch, {"foldable": foldable}))
        chosen, info = ship(cands, *verify.verify_patches(held, cands))
        seconds[label] = time.perf_counter() - t0
        fitted[label] = {a: chosen.get(a) for a, _ in runs_of(sel.removed)}
        fitted[label + " choice"] = [c["kind"] for c in info["verification"]["choice"]]
    pruned = models.drop_layers(copy.deepcopy(model), sel.removed)
    for kind in [*args.kinds, "auto", "auto foldable"]:
        ps = {a: p for a, p in fitted[kind].items() if p is not None}
        insert_patches(pruned, ps, removed=sel.removed)
        ppl, _ = eval_ppl(cfg, pruned, tok)
        fold = fold_check(pruned)
        strip_patches(pruned)
        row = {"n": n, "pruner": args.pruner, "removed": sel.removed, "kind": kind,
               "heldout_nll": held.nll(sel.removed, fitted[kind]), **ppl, "fit_seconds": round(seconds[kind], 2),
               **fold}
        if kind.startswith("auto"):
            row["choice"] = fitted[kind + " choice"]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    del pruned

res = REPO / "benchmarks" / "results"
(res / f"{args.out}.json").write_text(json.dumps(out, indent=2))
d = out["dense"]
lines = ["REDUCED comparison (issue 24 item 5): n = " + ", ".join(map(str, args.n)) + f", pruner={args.pruner} only, "
         f"no distillation; calib={args.calib}, PPL on {args.ppl_windows} x {args.ppl_seqlen} tokens; {out['dtype']}.",
         f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_foldable.py --n {' '.join(map(str, args.n))} "
         f"--pruner {args.pruner} --calib {args.calib} --ppl-windows {args.ppl_windows}`", "",
         f"dense: held-out NLL {d['nll']:.3f}, WikiText-2 {d['ppl/wikitext2']:.2f}, PTB {d['ppl/ptb']:.2f}", "",
         "| n | layers | patch | held-out NLL | WikiText-2 PPL | PTB PPL | fit (s) | saved as | stock reload = lp logits |",
         "|---|---|---|---|---|---|---|---|---|"]
for r in out["rows"]:
    tag = f"{r['kind']} → {'/'.join(r['choice'])}" if "choice" in r else r["kind"]
    saved = f"{r['layout']} ({'plain checkpoint' if r['plain_checkpoint'] else 'needs remote code'})"
    check = ("bit for bit" if r["logits_equal"] else f"rel {r['logits_rel']:.1e}") if "logits_equal" in r else "–"
    lines.append(f"| {r['n']} | {r['removed'][0]}–{r['removed'][-1]} | {tag} | {r['heldout_nll']:.3f} "
                 f"(PPL {math.exp(r['heldout_nll']):.1f}) | {r['ppl/wikitext2']:.2f} | {r['ppl/ptb']:.2f} | "
                 f"{r['fit_seconds']:.1f} | {saved} | {check} |")
(res / f"{args.out}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
