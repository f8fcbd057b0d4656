"""Every patch kind on the same cuts: WikiText-2 / PTB perplexity beside the held-out NLL, and the
cost of `patch=auto` as a ratio of the calibration pass.

SmolLM2-135M bf16, `pruner=linearpatch` (paper variant) at each n, calibration `calib=<--calib>`
(its `nval` held-out windows from the reserved tail). For each n: the block is selected once, every
kind is fitted on the dense model (`lp.patch.fit_patches`: one calibration-statistics pass shared
by all n, one activation pass per cut for lstsq / rotate_outlier), the held-out NLL of each kind
comes from `lp.verify` exactly as a run records it, `auto` is the per-cut choice among
`--candidates`, and the PPL of each kind is measured on one pruned copy with its patches swapped in.

Costs (seconds, wall): `calibration` = one calibration pass (`lp.calib.collect`, no disk cache);
`auto` = what `patch=auto` adds to a run after selection: fitting every candidate (incl. the
activation pass of lstsq) + the held-out replays (`lp.candidates.fit_candidates` + `lp.verify.verify_patches`, as `lp.run.make_patches`).

`--plant K` multiplies the model's massive channels (the 3 with the largest mean h^2 at the middle
layer, or `--channels`) by K: their embedding columns and the rows of every o_proj / down_proj
that write them, and divides the matching weights of every RMSNorm by K, so the layers read
them as before while they dominate ||h||^2 even more. Measured: this does NOT give a usable model
(K = 3: held-out NLL 10.4 with n = 3 and no patch, PPL ~1e4; K = 10: NLL 20), because the RMS of
every norm grows with K; the planted-outlier table uses `benchmarks/bench_planted.py` instead.

Usage: OMP_NUM_THREADS=1 flock /tmp/lp-heavy.lock python benchmarks/bench_patch_kinds.py \
         [--n 3 5 7] [--calib quick] [--ppl-windows 16] [--plant 0] [--out NAME]
Writes benchmarks/results/<NAME>.json and .md.
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lp import models, verify
from lp.calib import get_stats
from lp.candidates import fit_candidates, ship
from lp.patch import fit_patches, insert_patches, runs_of, strip_patches
from lp.pruners.linearpatch import LinearPatchPruner
from lp.run import eval_ppl, prune_context

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, nargs="+", default=[3, 5, 7])
p.add_argument("--calib", default="quick")
p.add_argument("--ppl-windows", type=int, default=16)
p.add_argument("--ppl-seqlen", type=int, default=512)
p.add_argument("--candidates", nargs="+", default=["none", "scalar", "diag", "rotate", "lstsq"])
p.add_argument("--extra", nargs="*", default=["rotate_outlier"], help="kinds measured beside auto's candidates")
p.add_argument("--plant", type=float, default=0.0)
p.add_argument("--channels", type=int, nargs="*", default=None)
p.add_argument("--out", default="patch_kinds")
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
    cfg = compose("config", overrides=[
        "model=smollm2_135m", f"calib={args.calib}", "patch=auto", f"data.root={root}", "eval=quick",
        "eval.ppl.datasets=[wikitext2,ptb]", f"eval.ppl.max_windows={args.ppl_windows}",
        f"eval.ppl.seqlen={args.ppl_seqlen}", "eval.ppl.progress=false",
        f"patch.candidates=[{','.join(args.candidates)}]"])
model, tok = models.load_model(cfg.model)


@torch.no_grad()
def plant(model, k: float, channels):
    """Scale the massive channels by k where they are written, by 1/k where a norm reads them."""
    dec = models.Decoder(model)
    if not channels:
        ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
        h = models.input_of(model, dec.layers[dec.num_layers // 2], ids)
        channels = (h.float() ** 2).mean((0, 1)).topk(3).indices.tolist()
    dec.backbone.embed_tokens.weight[:, channels] *= k
    for layer in dec.layers:
        layer.self_attn.o_proj.weight[channels] *= k
        layer.mlp.down_proj.weight[channels] *= k
        layer.input_layernorm.weight[channels] /= k
        layer.post_attention_layernorm.weight[channels] /= k
    dec.norm.weight[channels] /= k
    return channels


planted = plant(model, args.plant, args.channels) if args.plant else None
# no disk cache: time a fresh calibration pass; never reuse statistics of another (planted) model
ctx = dataclasses.replace(prune_context(cfg, model, tok), cache_key={})
t0 = time.perf_counter()
stats = get_stats(ctx)
calib_s = time.perf_counter() - t0
held = verify.Heldout(model, verify.heldout_windows(cfg, tok), cfg.calib.batch_size)
dense_ppl, _ = eval_ppl(cfg, model, tok)
out = {"settings": vars(args), "planted_channels": planted, "calibration_seconds": round(calib_s, 2),
       "dense": {"nll": held.nll([]), **dense_ppl}, "rows": []}
kinds = [*args.candidates, *[k for k in args.extra if k not in args.candidates]]
for n in args.n:
    sel = LinearPatchPruner(n).select(ctx)
    t0 = time.perf_counter()
    cands = fit_candidates(ctx, sel.removed, cfg.patch)  # what patch=auto adds to a run
    _, info = ship(cands, *verify.verify_patches(held, cands))
    warns = info["warnings"]
    auto_s = time.perf_counter() - t0
    fitted, _ = fit_patches(ctx, sel.removed, cfg.patch, [k for k in kinds if k != "none"])
    fitted["none"] = {a: None for a, _ in runs_of(sel.removed)}
    v = info["verification"]
    choice = {c["start"]: c["kind"] for c in v["choice"]}
    fitted["auto"] = {a: fitted[k][a] for a, k in choice.items()}
    pruned = models.drop_layers(copy.deepcopy(model), sel.removed)
    for kind in [*kinds, "auto"]:
        ps = {a: p for a, p in fitted[kind].items() if p is not None}
        insert_patches(pruned, ps)
        ppl, _ = eval_ppl(cfg, pruned, tok)
        strip_patches(pruned)
        nll = held.nll(sel.removed, fitted[kind])
        row = {"n": n, "removed": sel.removed, "kind": kind, "heldout_nll": nll, **ppl}
        if kind == "auto":
            row.update(choice=list(choice.values()), auto_seconds=round(auto_s, 2))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    del pruned

res = REPO / "benchmarks" / "results"
(res / f"{args.out}.json").write_text(json.dumps(out, indent=2))
lines = [f"dense: held-out NLL {out['dense']['nll']:.3f}, WikiText-2 {out['dense']['ppl/wikitext2']:.2f}, "
         f"PTB {out['dense']['ppl/ptb']:.2f}; calibration pass {calib_s:.1f}s",
         "", "| n | layers | patch | held-out NLL | WikiText-2 PPL | PTB PPL |", "|---|---|---|---|---|---|"]
for r in out["rows"]:
    tag = f"{r['kind']} → {'/'.join(r['choice'])} ({r['auto_seconds'] / calib_s:.2f}× calib)" if r["kind"] == "auto" \
        else r["kind"]
    lines.append(f"| {r['n']} | {r['removed'][0]}–{r['removed'][-1]} | {tag} | {r['heldout_nll']:.3f} "
                 f"(PPL {math.exp(r['heldout_nll']):.1f}) | {r['ppl/wikitext2']:.2f} | {r['ppl/ptb']:.2f} |")
(res / f"{args.out}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
