"""A sweep of the four similarity pruners x n = 1..8 pays for calibration once.

SmolLM2-135M bf16, calibration windows from WikiText-2 tokenized train (as `calib=wikitext2_tok`).
Reference: one run's calibration, i.e. `lp.calib.get_stats` with an empty disk cache (one pass
over the windows + the atomic save). Sweep: 32 jobs (linearpatch, shortgpt, streamline, angular x
n = 1..8), each as a fresh job would do it: a new `PruneContext` with the run's cache key,
`pruner.select` and, for every cut, the `patch=rotate` scales and matrix (`build_patches`); the
first job computes and saves the statistics, the other 31 load them from disk.
Target: sweep wall time <= 1.5x the reference. Model load and tokenization are outside both clocks
(a job whose statistics are cached never tokenizes the calibration corpus). Repeats are
interleaved, each with an empty cache folder; the minimum is kept (shared CPU).
Usage: flock /tmp/lp-heavy.lock python benchmarks/bench_sweep_calib.py [--nsamples 16] [--seqlen 2048]
Writes benchmarks/results/sweep_calib.json.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from lp import models
from lp.calib import Calibration, get_stats
from lp.patch import build_patches
from lp.pruners import PruneContext
from lp.pruners.angular import AngularPruner
from lp.pruners.linearpatch import LinearPatchPruner
from lp.pruners.shortgpt import ShortGPTPruner
from lp.pruners.streamline import StreamlinePruner
from lp.run import calibration, stats_key

p = argparse.ArgumentParser()
p.add_argument("--nsamples", type=int, default=16)
p.add_argument("--seqlen", type=int, default=2048)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--max-n", type=int, default=8)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
    cfg = compose("config", overrides=[
        "model=smollm2_135m", "patch=rotate", f"data.root={root}", f"calib.nsamples={args.nsamples}",
        f"calib.seqlen={args.seqlen}", f"calib.batch_size={args.batch_size}"])
model, tok = models.load_model(cfg.model)
windows, provenance = calibration(cfg, tok)
key = stats_key(cfg)
PRUNERS = (LinearPatchPruner, ShortGPTPruner, StreamlinePruner, AngularPruner)


def context():
    return PruneContext(model, tok, Calibration(lambda: (windows, provenance)), cache_key=key,
                        batch_size=args.batch_size)


def one_calibration():
    stats = get_stats(context())
    assert not stats.cost["cached"]
    return None


def sweep():
    picks, loads = {}, 0
    for cls in PRUNERS:
        for n in range(1, args.max_n + 1):
            ctx = context()
            sel = cls(n=n).select(ctx)
            build_patches(ctx, sel.removed, cfg.patch)
            loads += get_stats(ctx).cost["cached"]
            picks[f"{cls.name}/n={n}"] = sel.removed
    return picks, loads


times = {"one_calibration": [], "sweep": []}
for _ in range(args.repeats):
    for name, fn in (("one_calibration", one_calibration), ("sweep", sweep)):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["LP_CACHE_DIR"] = cache
            t = time.perf_counter()
            out = fn()
            times[name].append(round(time.perf_counter() - t, 3))
        if name == "sweep":
            picks, loads = out
best = {k: min(v) for k, v in times.items()}
jobs = len(PRUNERS) * args.max_n
res = {
    "model": cfg.model.name, "dtype": str(next(model.parameters()).dtype), "windows": args.nsamples,
    "seqlen": args.seqlen, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
    "jobs": jobs, "jobs_loading_cached_stats": loads, "seconds": times, "best_seconds": best,
    "ratio": best["sweep"] / best["one_calibration"], "selected": picks,
    "target": f"{len(PRUNERS)} pruners x n=1..{args.max_n} (select + rotate patches) <= 1.5 x one calibration",
}
res["pass"] = res["ratio"] <= 1.5 and loads == jobs - 1
out = REPO / "benchmarks/results/sweep_calib.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=2))
print(json.dumps({k: v for k, v in res.items() if k != "selected"}, indent=2))
