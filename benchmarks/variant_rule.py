"""Default block rule by evidence: `pruner.variant=paper` vs `reference` for n = 2..8 on the embedded model.

One calibration pass (the composed `calib`, default calib=official: WikiText-2 raw validation,
128 x 2048, seed 2) serves every n and both variants (`CalibStats`); each distinct block is then
pruned on a fresh copy of the dense model, patched (`patch`, default rotate with the constructed
basis) and evaluated with the composed `eval` (PPL only). Blocks chosen by both variants are
evaluated once. Writes benchmarks/results/variant_rule.json and prints a markdown table.
Usage: OMP_NUM_THREADS=1 python benchmarks/variant_rule.py [hydra overrides, e.g. eval.ppl.max_windows=8]
"""

import copy
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from lp import models
from lp.calib import get_stats
from lp.patch import build_patches, insert_patches
from lp.run import eval_ppl, prune_context

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["calib=official", "patch=rotate", "eval=official", "eval.ppl.loss_dtype=float32", "eval.ppl.max_windows=8",
            "eval.ppl.progress=false"]
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=[*DEFAULTS, *sys.argv[1:]])

t0 = time.perf_counter()
model, tok = models.load_model(cfg.model)
ctx = prune_context(cfg, model, tok)
stats = get_stats(ctx, progress=True)
L = stats.num_layers
blocks = {(v, n): int(stats.block_scores(n, v).nan_to_num(float("-inf")).argmax()) for n in range(2, 9)
          for v in ("paper", "reference")}
evaluated: dict = {}
for (_v, n), a in sorted(blocks.items(), key=lambda kv: kv[0][1]):
    if (a, n) in evaluated:
        continue
    m = copy.deepcopy(model)
    patches, _ = build_patches(ctx, list(range(a, a + n)), cfg.patch) if cfg.patch.kind != "none" else ({}, None)
    models.drop_layers(m, list(range(a, a + n)))
    insert_patches(m, {k: p.to(next(m.parameters()).device) for k, p in patches.items()})
    metrics, _ = eval_ppl(cfg, m, tok)
    evaluated[(a, n)] = metrics
    print(f"n={n} block [{a}, {a + n}) {metrics}", flush=True)

rows = [{"n": n, "variant": v, "block": [blocks[(v, n)], blocks[(v, n)] + n],
         **evaluated[(blocks[(v, n)], n)]} for n in range(2, 9) for v in ("paper", "reference")]
res = {"model": cfg.model.name, "calib": dict(cfg.calib), "patch": dict(cfg.patch), "eval": dict(cfg.eval.ppl),
       "num_layers": L, "rows": rows, "calibration": stats.cost, "seconds": round(time.perf_counter() - t0, 1)}
out = REPO / "benchmarks/results/variant_rule.json"
out.write_text(json.dumps(res, indent=2, default=str))
keys = [k for k in rows[0] if k.startswith("ppl/")]
print("| n | paper block | " + " | ".join(f"paper {k}" for k in keys) + " | reference block | "
      + " | ".join(f"reference {k}" for k in keys) + " |")
print("|---" * (3 + 2 * len(keys)) + "|")
for n in range(2, 9):
    p, r = (next(x for x in rows if x["n"] == n and x["variant"] == v) for v in ("paper", "reference"))
    print(f"| {n} | {p['block']} | " + " | ".join(f"{p[k]:.2f}" for k in keys) + f" | {r['block']} | "
          + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
