"""SLEB with the hidden-state prefix cache vs naive full re-scoring; Taylor+ time and peak memory.

SmolLM2-135M bf16 on WikiText-2 (tokenized) train calibration windows. Three SLEB runs, n steps each:
  * `cached`: `pruner=sleb` (each candidate at position p runs only the layers after p);
  * `naive`: `pruner.cache=false`, the same code re-running every remaining layer per candidate
    (isolates the prefix cache: same layer and LM-head code);
  * `naive_full_forward`: SLEB's reference loop, for each candidate the model without it,
    `model(input_ids).logits` and a float32 cross-entropy over them.
Target: cached selects the same layers as both naive runs and is >= 2x faster than the full-forward
re-scoring. Two things cap the gain of an exact prefix cache. Layers: a step over c = L'-2
candidates (L' kept layers, first and last excluded) costs sum_p (L'-1-p) + c ~ L'^2/2 layer calls
against c (L'-1) naive, 1.87x at L' = 30. The LM head (tied 49152 x 576 embedding on SmolLM2,
several layers' worth, `unit_cost_cpu_s`) runs once per candidate in every variant.
Usage (heavy: serialize with other jobs):
    flock /tmp/lp-heavy.lock python benchmarks/bench_sleb.py [--nsamples 8] [--seqlen 512] [--n 5] [--threads 1]
Times are reported as process CPU seconds (and wall seconds): with one thread, CPU time does not
depend on other jobs sharing the machine, where multi-threaded wall time can inflate several-fold.
Writes benchmarks/results/sleb.json. Peak memory is the process's VmHWM, reset (Linux
/proc/self/clear_refs) right before each measured call; Taylor+ runs in a fresh subprocess with
all allocations >= 64 KiB mmapped, so its peak is its own working set (SLEB's figures in this
process are lower bounds: memory freed earlier and reused does not raise the peak).
"""

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from lp import models
from lp.calib import Calibration
from lp.pruners import PruneContext
from lp.pruners.sleb import SLEBPruner
from lp.pruners.taylor import TaylorPruner
from lp.replay import Replay
from lp.run import calibration

REPO = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--nsamples", type=int, default=8)
p.add_argument("--seqlen", type=int, default=512)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--n", type=int, default=5)
p.add_argument("--taylor-nsamples", type=int, default=16)
p.add_argument("--threads", type=int, default=1,
               help="torch threads; 1 + CPU time is robust to other jobs on a shared machine")
p.add_argument("--taylor-windows", help="internal: run only Taylor+ on these saved windows, print JSON")
args = p.parse_args()
torch.set_num_threads(args.threads)


def windows_for(nsamples):
    root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["model=smollm2_135m", "calib=quick", f"calib.nsamples={nsamples}",
                                           f"calib.seqlen={args.seqlen}", f"data.root={root}"])
    return cfg, calibration(cfg, tok)[0]


def mem_mb(key: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last `reset_peak`) of this process, in MiB."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def reset_peak():
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS


def measured(fn):
    """(result, {wall_s, cpu_s}, {rss_before_mb, peak_mb}) of fn()."""
    reset_peak()
    before, t, c = mem_mb("VmRSS"), time.perf_counter(), time.process_time()
    out = fn()
    secs = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2)}
    return out, secs, {"rss_before_mb": before, "peak_mb": mem_mb("VmHWM")}


with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
    model, tok = models.load_model(compose("config", overrides=["model=smollm2_135m"]).model)

if args.taylor_windows:
    twin = torch.load(args.taylor_windows, weights_only=True)
    tctx = PruneContext(model, None, Calibration(lambda: (twin, {})))
    sel, secs, mem = measured(lambda: TaylorPruner(n=args.n).select(tctx))
    dec = models.Decoder(model)
    acc = sum(4 * q.numel() for i in range(4, dec.num_layers - 2) for q in dec.layers[i].parameters())
    print(json.dumps({"removed": sel.removed, **secs, "windows": list(twin.shape), "micro_batch": 1,
                      "memory": mem, "fp32_accumulators_mb": round(acc / 2**20, 1), "scores": sel.info["scores"]}))
    sys.exit(0)

load_start = os.getloadavg()
_, windows = windows_for(args.nsamples)
ctx = PruneContext(model, None, Calibration(lambda: (windows, {})), batch_size=args.batch_size)

# Unit costs (CPU seconds): one layer / one head (norm + LM head + CE) over all windows.
runner = Replay(model, windows, args.batch_size)
h0 = runner.embed()
runner.advance(h0, 0, torch.empty_like(h0))  # warm-up (captures layer kwargs)
t = time.process_time()
for i in range(1, 4):
    runner.advance(h0, i, torch.empty_like(h0))
layer_s = (time.process_time() - t) / 3
t = time.process_time()
runner.nll(h0, [])
head_s = time.process_time() - t
del runner, h0

runs = {}
for name, kw in (("cached", {"cache": True}), ("naive", {"cache": False})):
    sel, secs, mem = measured(lambda kw=kw: SLEBPruner(n=args.n, **kw).select(ctx))
    runs[name] = {**secs, "order": sel.info["order"], "layer_calls": sel.info["layer_calls"],
                  "head_calls": sel.info["head_calls"], "calib_nll_after": sel.info["calib_nll_after"],
                  "memory": mem, "steps": sel.info["steps"]}
    print(name, secs, sel.info["order"], mem, flush=True)


@torch.inference_mode()
def naive_full_forward(n: int) -> dict:
    """SLEB's reference re-scoring: a full forward of the model without each candidate."""
    dec = models.Decoder(model)
    layers, L = dec.layers, dec.num_layers
    kept, steps = list(range(L)), []
    try:
        for _ in range(n):
            scores = {}
            for cand in [i for i in kept if 0 < i < L - 1]:
                dec.backbone.layers = torch.nn.ModuleList(layers[i] for i in kept if i != cand)
                nll = []
                for b in range(0, len(windows), args.batch_size):
                    ids = windows[b:b + args.batch_size]
                    logits = model(input_ids=ids, use_cache=False).logits
                    nll += [F.cross_entropy(lg[:-1].float(), t[1:]).double() for lg, t in zip(logits, ids, strict=True)]
                scores[cand] = torch.stack(nll).mean().item()
            best = min(scores, key=lambda i: (scores[i], i))
            steps.append({"removed": best, "nll": [scores.get(i) for i in range(L)]})
            kept.remove(best)
    finally:
        dec.backbone.layers = layers
    return {"order": [s["removed"] for s in steps], "steps": steps, "calib_nll_after": steps[-1]["nll"][best]}


sel, secs, mem = measured(lambda: naive_full_forward(args.n))
runs["naive_full_forward"] = {**secs, **sel, "memory": mem}
print("naive_full_forward", secs, sel["order"], mem, flush=True)
cached, naive, full = runs["cached"], runs["naive"], runs["naive_full_forward"]
max_diff = max(abs(a - b) for sc, sf in zip(cached["steps"], full["steps"], strict=True)
               for a, b in zip(sc["nll"], sf["nll"], strict=True) if a is not None)
same_scores = cached["steps"] == naive["steps"]
for r in runs.values():
    r["steps"] = [s["nll"] for s in r["steps"]] if r is cached else None
full["scores_max_abs_diff_vs_cached"] = max_diff

_, twin = windows_for(args.taylor_nsamples)
with tempfile.TemporaryDirectory() as tmp:
    torch.save(twin, f"{tmp}/windows.pt")
    # Fresh process, every allocation >= 64 KiB mmapped: its peak RSS is Taylor+'s own working set.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--threads", str(args.threads),
                           "--taylor-windows", f"{tmp}/windows.pt"],
                          capture_output=True, text=True, env=env)
if proc.returncode:
    raise RuntimeError(f"taylor subprocess failed:\n{proc.stderr[-3000:]}")
taylor = json.loads(proc.stdout.strip().splitlines()[-1])
print("taylor", {k: v for k, v in taylor.items() if k != "scores"}, flush=True)

out = {
    "model": "smollm2_135m", "dtype": "bfloat16", "device": "cpu", "threads": torch.get_num_threads(),
    "timing_note": "cpu_s = process CPU time (robust to other jobs with 1 thread); wall_s as measured",
    "calibration": {"corpus": "wikitext2_tok train", "nsamples": args.nsamples, "seqlen": args.seqlen,
                    "seed": 2, "batch_size": args.batch_size},
    "n": args.n, "unit_cost_cpu_s": {"layer": round(layer_s, 3), "head": round(head_s, 3),
                                 "head_over_layer": round(head_s / layer_s, 1)},
    "sleb": runs, "same_selection": cached["order"] == naive["order"] == full["order"],
    "same_scores_as_naive": same_scores,
    "speedup_cpu_vs_full_forward": round(full["cpu_s"] / cached["cpu_s"], 2),
    "speedup_wall_vs_full_forward": round(full["wall_s"] / cached["wall_s"], 2),
    "speedup_cpu_vs_naive": round(naive["cpu_s"] / cached["cpu_s"], 2),
    "speedup_wall_vs_naive": round(naive["wall_s"] / cached["wall_s"], 2),
    "layer_call_ratio": round(naive["layer_calls"] / cached["layer_calls"], 2),
    "work_ratio": round((naive["layer_calls"] * layer_s + naive["head_calls"] * head_s)
                        / (cached["layer_calls"] * layer_s + cached["head_calls"] * head_s), 2),
    "taylor": taylor, "load_avg": {"start": load_start, "end": os.getloadavg()},
}
dest = REPO / "benchmarks" / "results" / "sleb.json"
dest.parent.mkdir(exist_ok=True)
out["pass"] = out["same_selection"] and out["speedup_cpu_vs_full_forward"] >= 2
dest.write_text(json.dumps(out, indent=2))
print(json.dumps({k: v for k, v in out.items() if k.startswith(("unit", "same", "speedup", "work", "pass"))}))
