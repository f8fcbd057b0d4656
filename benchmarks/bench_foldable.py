"""Foldable patches on the embedded model (issue 24): every kind on the same cut, with and without
`distill=quick`, which kinds fold into a plain checkpoint, the cost of each fit, and the check that a
folded save reloads with stock `from_pretrained` to the in-memory model's logits.

SmolLM2-135M bf16, for each `--pruner` and each n: the block is selected once; each kind is fitted alone
on the dense model (`lp.patch.fit_patches`, timed per kind: calibration statistics come from the disk
cache, so the seconds are the kind's own work, i.e. its activation pass for lstsq / lstsq_mlp /
rotate_mlp); the held-out NLL is `lp.verify.Heldout` as a run records it; `auto` and `auto foldable`
are what `lp.run.make_patches` does (`lp.candidates.fit_candidates`, `lp.verify.verify_patches`,
`lp.candidates.ship`) with `patch=auto` (default candidates) and `patch.foldable=true` (timed: what they
add to a run after selection); WikiText-2 / PTB PPL on one pruned copy with the patches
swapped in. Fold check: `lp.export.save_pruned` of that copy (layout `plain`/`folded` = a stock
checkpoint) and, for those, a stock `AutoModelForCausalLM.from_pretrained` in this process, logits
compared with the in-memory model on 2 x 64 tokens (`equal` = bit for bit; `rel` = max |diff| / max |logit|).

`--distill quick` (default) then trains each kind's patches with `lp.distill.distill` (`conf/distill/quick.yaml`:
64 x 512-token windows, one epoch, teacher = the dense model's top-50 logits, cached once) and measures
the same columns again, the fold check included (the fold must stay exact after training). An `auto` row
whose patches equal (bit for bit) those of a kind already distilled reuses that kind's distilled numbers
(`distilled_from` says which), since training is deterministic from the same start.

Usage: OMP_NUM_THREADS=1 python benchmarks/bench_foldable.py [--n 5 3 7] [--pruner linearpatch shortgpt]
         [--calib quick] [--ppl-windows 8] [--distill quick|none] [--distill-at 5]
         [--distill-pruner linearpatch] [--distill-kinds rotate lstsq lstsq_mlp] [--out foldable]
         [--set model.dtype=float32 distill.autocast=none]
(threads: OMP_NUM_THREADS; on a CPU without native bf16, e.g. AMD EPYC Zen 2/3, float32 is several times faster.)
Writes benchmarks/results/<NAME>.json and .md after every row (a long run interrupted keeps its rows).
"""

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lp import distill, models, verify
from lp.candidates import fit_candidates, ship
from lp.export import save_pruned
from lp.patch import fit_patches, insert_patches, runs_of, strip_patches
from lp.run import build, eval_ppl, prune_context

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, nargs="+", default=[3, 5, 7])
p.add_argument("--pruner", nargs="+", default=["linearpatch", "shortgpt"])
p.add_argument("--calib", default="quick")
p.add_argument("--distill", default="quick", choices=["quick", "none"])
p.add_argument("--distill-at", type=int, nargs="*", default=None, help="n values with distilled rows (default: all)")
p.add_argument("--distill-pruner", nargs="*", default=None, help="selections with distilled rows (default: all)")
p.add_argument("--distill-kinds", nargs="*", default=None, help="kinds with distilled rows (default: all)")
p.add_argument("--ppl-windows", type=int, default=8)
p.add_argument("--ppl-seqlen", type=int, default=512)
p.add_argument("--kinds", nargs="+", default=["none", "scalar", "diag", "rotate", "lstsq", "lstsq_mlp", "rotate_mlp"])
p.add_argument("--out", default="foldable")
p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
               help="more config overrides, e.g. model.dtype=float32 distill.autocast=none")
p.add_argument("--resume", action="store_true",
               help="keep the complete (n, selection) blocks of the results file and measure the others; the "
                    "measurement settings must match (the --distill-* limits may differ)")
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
RES = REPO / "benchmarks" / "results"
MEASURED = ("calib", "distill", "ppl_windows", "ppl_seqlen", "kinds", "set")  # what makes two runs' rows comparable
prev = json.loads((RES / f"{args.out}.json").read_text()) if args.resume and (RES / f"{args.out}.json").exists() else None
runs = [vars(args)]
if prev is not None:  # checked before any model work
    runs = [*(prev["settings"] if isinstance(prev["settings"], list) else [prev["settings"]]), vars(args)]
    diff = {k: (runs[0].get(k, []), vars(args)[k]) for k in MEASURED if runs[0].get(k, []) != vars(args)[k]}
    if diff:
        raise SystemExit(f"--resume: {RES / args.out}.json was measured with other settings {diff}; "
                         f"use another --out or the same settings")
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
    cfg = compose("config", overrides=[
        "model=smollm2_135m", f"calib={args.calib}", "patch=auto", f"data.root={root}", "eval=quick",
        f"distill={args.distill}", "eval.ppl.datasets=[wikitext2,ptb]", f"eval.ppl.max_windows={args.ppl_windows}",
        f"eval.ppl.seqlen={args.ppl_seqlen}", "eval.ppl.progress=false", *args.set])
model, tok = models.load_model(cfg.model)
ctx = prune_context(cfg, model, tok)
held = verify.Heldout(model, verify.heldout_windows(cfg, tok), cfg.calib.batch_size)
ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
dense_ppl, _ = eval_ppl(cfg, model, tok)
teacher = distill.prepare_teacher(cfg, model, tok)[0] if args.distill != "none" else None
cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
out = {"settings": runs, "host": {"cpu": cpu, "threads": torch.get_num_threads()}, "dtype": str(next(model.parameters()).dtype),
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


def measure(pruned, removed, ps) -> dict:
    """Held-out NLL, PPL and the fold check of `pruned` with the patches `ps` (in place)."""
    ppl, _ = eval_ppl(cfg, pruned, tok)
    return {"heldout_nll": held.nll(removed, ps), **ppl, **fold_check(pruned)}


def same_patches(a: dict, b: dict) -> bool:
    """The two {cut: patch} dicts hold the same kinds with bit-identical weights."""
    if a.keys() != b.keys():
        return False
    for k in a:
        if (a[k] is None) != (b[k] is None) or a[k] is None:
            if a[k] is not b[k]:
                return False
            continue
        sa, sb = a[k].state_dict(), b[k].state_dict()
        if type(a[k]) is not type(b[k]) or sa.keys() != sb.keys() or not all(torch.equal(sa[x], sb[x]) for x in sa):
            return False
    return True


def write() -> None:
    (RES / f"{args.out}.json").write_text(json.dumps(out, indent=2))
    d = out["dense"]

    def command(a: dict) -> str:
        return (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_foldable.py --n {' '.join(map(str, a['n']))}"
                f" --pruner {' '.join(a['pruner'])} --calib {a['calib']} --ppl-windows {a['ppl_windows']} --distill {a['distill']}"
                + "".join(f" --{k.replace('_', '-')} {' '.join(map(str, v))}" for k, v in a.items()
                          if k.startswith("distill_") and v is not None)
                + (f" --set {' '.join(a['set'])}" if a.get("set") else "") + (" --resume" if a.get("resume") else ""))
    lines = [f"Foldable patches (issue 24 item 5): SmolLM2-135M {out['dtype']}, {cpu}, {torch.get_num_threads()} thread(s); "
             f"calib={args.calib} (held-out NLL on its reserved tail); WikiText-2 / PTB PPL on {args.ppl_windows} x "
             f"{args.ppl_seqlen} tokens; distilled columns: distill={args.distill}.",
             "Command" + ("s, in order (a later one keeps the blocks measured before): " if len(runs) > 1 else ": ")
             + "; ".join(f"`{command(a)}`" for a in runs), "",
             f"dense: held-out NLL {d['nll']:.3f}, WikiText-2 {d['ppl/wikitext2']:.2f}, PTB {d['ppl/ptb']:.2f}", "",
             "fit (s): the kind's own fitting work after selection; distill (s): the training of its patches. "
             "`saved as`: `plain`/`folded` = a stock checkpoint of the base architecture (no remote code); "
             "`reload`: stock from_pretrained logits vs lp's in-memory model.", "",
             "| selection | n | layers | patch | held-out NLL | WikiText-2 | PTB | fit (s) | saved as | reload "
             "| distilled: held-out NLL | WikiText-2 | PTB | distill (s) | saved as | reload |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def check(r):
        if "logits_equal" not in r:
            return "–"
        return "bit for bit" if r["logits_equal"] else f"rel {r['logits_rel']:.1e}"

    def saved(r):
        return f"{r['layout']}{'' if r['plain_checkpoint'] else ' (remote code)'}"

    for r in out["rows"]:
        tag = f"{r['kind']} → {'/'.join(r['choice'])}" if "choice" in r else r["kind"]
        layers = ",".join(f"{a}–{b - 1}" if b - a > 1 else str(a) for a, b in runs_of(r["removed"]))
        cells = [r["pruner"], r["n"], layers, tag, f"{r['heldout_nll']:.3f}", f"{r['ppl/wikitext2']:.2f}",
                 f"{r['ppl/ptb']:.2f}", f"{r['fit_seconds']:.1f}", saved(r), check(r)]
        dd = r.get("distilled")
        if dd:
            cells += [f"{dd['heldout_nll']:.3f}", f"{dd['ppl/wikitext2']:.2f}", f"{dd['ppl/ptb']:.2f}",
                      f"{dd['distill_seconds']:.0f}" + (f" (= {dd['distilled_from']})" if "distilled_from" in dd else ""),
                      saved(dd), check(dd)]
        else:
            cells += ["–"] * 6
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    (RES / f"{args.out}.md").write_text("\n".join(lines) + "\n")


BLOCK = len(args.kinds) + 2  # rows per (n, selection): every kind, auto, auto foldable
if prev is not None:  # keep the complete blocks (an interrupted block is measured again)
    count = {}
    for r in prev["rows"]:
        count[r["n"], r["pruner"]] = count.get((r["n"], r["pruner"]), 0) + 1
    out["rows"] = [r for r in prev["rows"] if count[r["n"], r["pruner"]] == BLOCK]
done = {(r["n"], r["pruner"]) for r in out["rows"]}
for n in args.n:  # n outer: a long run interrupted keeps whole n blocks (the first n given first)
    for pruner in [x for x in args.pruner if (n, x) not in done]:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            pcfg = compose("config", overrides=[f"pruner={pruner}"]).pruner
        sel = build(OmegaConf.merge(pcfg, {"n": n})).select(ctx)
        cuts = [a for a, _ in runs_of(sel.removed)]
        fitted, seconds, choice = {"none": {a: None for a in cuts}}, {"none": 0.0}, {}
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
            fitted[label] = {a: chosen.get(a) for a in cuts}
            choice[label] = [c["kind"] for c in info["verification"]["choice"]]
        pruned = models.drop_layers(copy.deepcopy(model), sel.removed)
        distilled = {}  # kind -> (its patches before training, the distilled measurements)
        for kind in [*args.kinds, "auto", "auto foldable"]:
            ps = {a: p for a, p in fitted[kind].items() if p is not None}
            start = copy.deepcopy(fitted[kind])
            insert_patches(pruned, ps, removed=sel.removed)
            row = {"n": n, "pruner": pruner, "removed": sel.removed, "kind": kind,
                   "fit_seconds": round(seconds[kind], 2), **measure(pruned, sel.removed, fitted[kind])}
            if kind in choice:
                row["choice"] = choice[kind]
            twin = next((k for k, (s, _) in distilled.items() if same_patches(s, start)), None) if ps else None
            if twin is not None:  # the same patches were distilled already (auto's choice): the same numbers
                row["distilled"] = {**distilled[twin][1], "distilled_from": twin}
            elif teacher is not None and ps and all(v is None or x in v for x, v in (
                    (n, args.distill_at), (pruner, args.distill_pruner), (kind, args.distill_kinds))):
                info = distill.distill(pruned, teacher, cfg.distill, progress=False)
                dd = {**measure(pruned, sel.removed, fitted[kind]), "distill_seconds": round(info["wall_s"]["total"], 1),
                      "distill_val_ppl": [info["val_ppl_before"], info["val_ppl_after"]],
                      "patch_rel_change": info["patch_rel_change"]}
                distilled[kind] = (start, dd)
                row["distilled"] = dd
            strip_patches(pruned)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            write()
        del pruned
write()
print((RES / f"{args.out}.md").read_text())
