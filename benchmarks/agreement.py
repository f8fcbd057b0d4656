"""How often the held-out verification decides as the reported test PPL does (lp issue 26).

For each depth pruner and n (SmolLM2-135M, `calib=quick`), the block is selected once and every kind
in `--kinds` is fitted at its cuts (`lp.patch.fit_patches`). The per-window NLL of the pruned model
with each kind (`lp.verify.Heldout.window_nll`: the replay a run's verification uses) is measured on
three window sets:

  * `calib`: the calibration holdout tail (`patch.verify_on=calib`), `--nval` windows of calib.seqlen;
  * `val`: `patch.verify_on=wikitext2:validation`, `--nval` windows of eval.ppl.seqlen;
  * `test`: the windows the run reports (`eval=quick`: the first `--test-windows` WikiText-2 test
    windows of 512 tokens); PPL = exp(mean window NLL), as `lp.evaluate.ppl` computes it.

Both held-out draws are nested: the first k of `--nval` windows are exactly the run's draw with
`calib.nval=k` (the calibration sampler draws the tail windows in order; verify_on takes a prefix of
one seeded permutation), so every k in `--ks` is scored from one measurement.

Decisions compared with the test decision, per configuration and held-out set of k windows:
  * "X is worse than none" for each patched kind X (the run's warning): old rule = held-out
    difference > PATCH_MARGIN; new rule = also >= 2 SE (lp.verify). Test: test NLL difference > margin.
  * "which kind" (patch=auto among `--kinds`): old = lowest held-out NLL; new = none unless the best
    kind is significantly better (lp.verify.choose_per_cut). Test: lowest test PPL. Also the regret:
    test PPL of the chosen kind / the best test PPL.

Usage: OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agreement.py [--pruners shortgpt linearpatch]
         [--n 2 4 6 8] [--nval 32] [--ks 8 32] [--analyze]   (--analyze: tables from the saved JSON only)
Writes benchmarks/results/agreement.json (every per-window NLL; rewritten after each configuration)
and agreement.md.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lp import data, models, verify
from lp.calib import get_stats
from lp.patch import fit_patches, runs_of
from lp.run import build, prune_context

p = argparse.ArgumentParser()
p.add_argument("--pruners", nargs="+", default=["shortgpt", "linearpatch"])
p.add_argument("--n", type=int, nargs="+", default=[2, 4, 6, 8])
p.add_argument("--kinds", nargs="+", default=["none", "scalar", "diag", "rotate"])
p.add_argument("--nval", type=int, default=32)
p.add_argument("--ks", type=int, nargs="+", default=[8, 32])
p.add_argument("--test-windows", type=int, default=8)
p.add_argument("--seqlen", type=int, default=512)
p.add_argument("--analyze", action="store_true")
p.add_argument("--out", default="agreement")
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
RES = REPO / "benchmarks" / "results"
MARGIN = verify.PATCH_MARGIN


def measure() -> dict:
    root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    common = ["model=smollm2_135m", "calib=quick", f"calib.nval={args.nval}", f"data.root={root}", "eval=quick",
              f"eval.ppl.seqlen={args.seqlen}", f"eval.ppl.max_windows={args.test_windows}", "patch=rotate"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfgs = {(pr, n): compose("config", overrides=[*common, f"pruner={pr}", f"pruner.n={n}"])
                for n in args.n for pr in args.pruners}  # n outer: a run stopped early still covers every pruner
        val_cfg = compose("config", overrides=[*common, "patch.verify_on=wikitext2:validation"])
    cfg0 = next(iter(cfgs.values()))
    model, tok = models.load_model(cfg0.model)
    ctx = prune_context(cfg0, model, tok)
    t0 = time.perf_counter()
    get_stats(ctx)  # the calibration pass (disk cache when present)
    stats_s = time.perf_counter() - t0
    sets = {"calib": verify.heldout_set(cfg0, tok), "val": verify.heldout_set(val_cfg, tok)}
    test, prov = data.eval_windows(tok, "wikitext2", "test", args.seqlen, root, "auto", args.test_windows)
    sets["test"] = (test, {"on": "wikitext2:test (reported)", "seqlen": args.seqlen, "windows": len(test), **prov})
    out = {"settings": vars(args), "model": cfg0.model.name, "calib_stats_seconds": round(stats_s, 2),
           "sets": {k: v[1] for k, v in sets.items()}, "configs": []}
    held = {k: verify.Heldout(model, w, 4, source=s) for k, (w, s) in sets.items()}
    seen = {}
    for (pr, n), cfg in cfgs.items():
        t0 = time.perf_counter()
        sel = build(cfg.pruner).select(ctx)
        removed = sorted(sel.removed)
        row = {"pruner": pr, "n": n, "removed": removed, "select_seconds": round(time.perf_counter() - t0, 2)}
        if tuple(removed) in seen:
            row.update(same_as=seen[tuple(removed)])
            out["configs"].append(row)
            continue
        seen[tuple(removed)] = f"{pr} n={n}"
        fitted, _ = fit_patches(ctx, removed, cfg.patch, [k for k in args.kinds if k != "none"])
        fitted["none"] = {a: None for a, _ in runs_of(removed)}
        row["nll"], row["seconds"] = {}, {}
        for name, h in held.items():
            t0 = time.perf_counter()
            row["nll"][name] = {k: h.window_nll(removed, fitted[k]).tolist() for k in args.kinds}
            row["seconds"][name] = round(time.perf_counter() - t0, 2)
        out["configs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "nll"}), flush=True)
        (RES / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- analysis
def decisions(nll: dict, k: int | None) -> dict:
    """Per-window NLL {kind: [..]} (first k windows) -> worse-than-none per kind (old, new rule) and the
    kind chosen (old: lowest mean; new: none unless significantly better, as lp.verify decides)."""
    vec = {kind: torch.tensor(v[:k] if k else v, dtype=torch.float64) for kind, v in nll.items()}
    cmp = {kind: verify.paired(v, vec["none"]) for kind, v in vec.items() if kind != "none"}
    best = min(vec, key=lambda kd: vec[kd].mean().item())
    new = best if best == "none" or verify.better(cmp[best]) else "none"
    return {"mean": {kd: v.mean().item() for kd, v in vec.items()}, "cmp": cmp,
            "worse_old": {kd: c["diff"] > MARGIN for kd, c in cmp.items()},
            "worse_new": {kd: verify.beyond(c, MARGIN) for kd, c in cmp.items()},
            "choice_old": best, "choice_new": new}


def analyze(out: dict) -> str:
    rows = [r for r in out["configs"] if "nll" in r]
    done, todo = len(out["configs"]), len(out["settings"]["pruners"]) * len(out["settings"]["n"])
    kinds = out["settings"]["kinds"]
    ks = out["settings"]["ks"]
    lines = [f"# Held-out verification vs the reported test PPL ({out['model']})", "",
             "Reduced from lp issue 26 item 3 to fit a shared 2-core CPU (`runtime.threads=1`): pruners "
             f"{', '.join(out['settings']['pruners'])}; n = {', '.join(map(str, sorted({r['n'] for r in out['configs']})))}"
             f"{' (stopped early: of ' + ' '.join(map(str, out['settings']['n'])) + ')' if done < todo else ''}; "
             f"kinds {', '.join(kinds)} (auto's default candidates without lstsq); held-out k = "
             f"{', '.join(map(str, ks))} windows (not 128); `calib=quick` (16x512); test = the reported "
             f"`eval=quick` PPL ({out['sets']['test']['windows']} WikiText-2 test windows of "
             f"{out['sets']['test']['seqlen']} tokens). {len(rows)} distinct configurations "
             f"({len(out['configs']) - len(rows)} duplicates of another pruner's block skipped). "
             f"Command: `{command(out['settings'])}`.", "",
             f"Held-out sets: calib = the calibration holdout tail ({out['sets']['calib']['seqlen']} tokens); "
             f"val = `patch.verify_on=wikitext2:validation` ({out['sets']['val']['seqlen']} tokens). "
             f"Margin {MARGIN} nats; significant = |diff| >= {verify.SIGNIFICANCE:g} SE (paired over windows).", "",
             "## Is X worse than no patch? (warning vs the test PPL's verdict)", "",
             "| held-out | k | rule | agree | warned | false warnings | missed | agree where the test is sure "
             "| cost s/config |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name in ("calib", "val"):
        for k in ks:
            for rule in ("old", "new"):
                agree = warned = false = missed = total = sure = sure_agree = 0
                for r in rows:
                    d, t = decisions(r["nll"][name], k), decisions(r["nll"]["test"], None)
                    for kd in d["worse_old"]:
                        w, truth = d[f"worse_{rule}"][kd], t["worse_old"][kd]
                        total += 1
                        agree += w == truth
                        warned += w
                        false += w and not truth
                        missed += truth and not w
                        if t["cmp"][kd]["significant"]:  # the test difference itself is >= 2 SE over its windows
                            sure += 1
                            sure_agree += w == truth
                cost = sum(r["seconds"][name] for r in rows) / len(rows) * k / out["settings"]["nval"]
                summary[(name, k, rule, "warn")] = agree / total
                lines.append(f"| {name} | {k} | {rule} | {agree}/{total} ({100 * agree / total:.0f}%) | {warned} | "
                             f"{false} | {missed} | {sure_agree}/{sure} | {cost:.0f} |")
    lines += ["", "Old rule: difference > margin; new rule: difference > margin and >= 2 SE. Test verdict: test "
              "NLL difference > margin; \"the test is sure\": the test difference is itself >= 2 SE over its windows. Cost: seconds to score all kinds on k windows (scaled from the "
              f"{out['settings']['nval']}-window measurement), one thread.", "",
              "## Which kind? (patch=auto vs the lowest test PPL)", "",
              "| held-out | k | rule | same as test best | mean test-PPL regret | max regret |", "|---|---|---|---|---|---|"]
    for name in ("calib", "val"):
        for k in ks:
            for rule in ("old", "new"):
                same, regrets = 0, []
                for r in rows:
                    d, t = decisions(r["nll"][name], k), decisions(r["nll"]["test"], None)
                    c = d[f"choice_{rule}"]
                    same += c == t["choice_old"]
                    regrets.append(math.exp(t["mean"][c] - t["mean"][t["choice_old"]]))
                summary[(name, k, rule, "choice")] = same / len(rows)
                lines.append(f"| {name} | {k} | {rule} | {same}/{len(rows)} | x{sum(regrets) / len(regrets):.3f} | "
                             f"x{max(regrets):.3f} |")
    lines += ["", "Regret: test PPL of the chosen kind / the lowest test PPL among the kinds (x1.000 = the best).",
              "", "## Per configuration (test PPL; held-out differences vs none as mean ± SE, k = max)", "",
              "| pruner | n | removed | test PPL " + " / ".join(kinds) + " | calib: " + " / ".join(kinds[1:])
              + " | val: " + " / ".join(kinds[1:]) + " | test: " + " / ".join(kinds[1:]) + " |",
              "|---|---|---|---|---|---|---|"]
    for r in out["configs"]:
        if "nll" not in r:
            lines.append(f"| {r['pruner']} | {r['n']} | {r['removed']} | same block as {r['same_as']} | | | |")
            continue
        t = decisions(r["nll"]["test"], None)
        cells = []
        for name in ("calib", "val", "test"):
            d = decisions(r["nll"][name], None)
            cells.append(" / ".join(f"{d['cmp'][kd]['diff']:+.3f}±{d['cmp'][kd]['se']:.3f}" for kd in kinds[1:]))
        lines.append(f"| {r['pruner']} | {r['n']} | {r['removed']} | "
                     + " / ".join(f"{math.exp(t['mean'][kd]):.1f}" for kd in kinds) + f" | {cells[0]} | {cells[1]} | {cells[2]} |")
    return "\n".join(lines) + "\n"


def command(settings: dict) -> str:
    return "OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/agreement.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in settings.items() if k not in ("analyze", "out"))


if __name__ == "__main__":
    result = json.loads((RES / f"{args.out}.json").read_text()) if args.analyze else measure()
    md = analyze(result)
    (RES / f"{args.out}.md").write_text(md)
    print(md)
