"""SLEB with the hidden-state prefix cache vs naive full re-scoring; Taylor+ time and peak memory.

SmolLM2-135M bf16 on WikiText-2 (tokenized) train calibration windows. Target: cached SLEB selects
the same layers as `cache: false` with identical scores, and is faster (brief: >= 2x).
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
from hydra import compose, initialize_config_dir

from lp import models
from lp.pruners import PruneContext
from lp.pruners._suffix import LayerRunner
from lp.pruners.sleb import SLEBPruner
from lp.pruners.taylor import TaylorPruner
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
    tctx = PruneContext(model, None, calib_fn=lambda: (twin, {}))
    sel, secs, mem = measured(lambda: TaylorPruner(n=args.n).select(tctx))
    dec = models.Decoder(model)
    acc = sum(4 * q.numel() for i in range(4, dec.num_layers - 2) for q in dec.layers[i].parameters())
    print(json.dumps({"removed": sel.removed, **secs, "windows": list(twin.shape), "micro_batch": 1,
                      "memory": mem, "fp32_accumulators_mb": round(acc / 2**20, 1), "scores": sel.info["scores"]}))
    sys.exit(0)

load_start = os.getloadavg()
_, windows = windows_for(args.nsamples)
ctx = PruneContext(model, None, calib_fn=lambda: (windows, {}), batch_size=args.batch_size)

# Unit costs (CPU seconds): one layer / one head (norm + LM head + CE) over all windows.
runner = LayerRunner(model, windows, args.batch_size)
h0 = runner.embed()
runner.advance(h0, 0, torch.empty_like(h0))  # warm-up (captures layer kwargs)
t = time.process_time()
for i in range(1, 4):
    runner.advance(h0, i, torch.empty_like(h0))
layer_s = (time.process_time() - t) / 3
t = time.process_time()
runner.suffix_nll(h0, [])
head_s = time.process_time() - t
del runner, h0

runs = {}
for name, kw in (("cached", {"cache": True}), ("naive", {"cache": False})):
    sel, secs, mem = measured(lambda kw=kw: SLEBPruner(n=args.n, **kw).select(ctx))
    runs[name] = {**secs, "order": sel.info["order"], "layer_calls": sel.info["layer_calls"],
                  "head_calls": sel.info["head_calls"], "calib_nll_after": sel.info["calib_nll_after"],
                  "memory": mem, "steps": sel.info["steps"]}
    print(name, secs, sel.info["order"], mem, flush=True)
cached, naive = runs["cached"], runs["naive"]
same_scores = cached["steps"] == naive["steps"]
for r in runs.values():
    r["steps"] = [s["nll"] for s in r["steps"]] if r is cached else None

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
    "sleb": runs, "same_selection": cached["order"] == naive["order"], "same_scores": same_scores,
    "speedup_cpu": round(naive["cpu_s"] / cached["cpu_s"], 2),
    "speedup_wall": round(naive["wall_s"] / cached["wall_s"], 2),
    "work_ratio": round((naive["layer_calls"] * layer_s + naive["head_calls"] * head_s)
                        / (cached["layer_calls"] * layer_s + cached["head_calls"] * head_s), 2),
    "taylor": taylor, "load_avg": {"start": load_start, "end": os.getloadavg()},
}
dest = REPO / "benchmarks" / "results" / "sleb.json"
dest.parent.mkdir(exist_ok=True)
dest.write_text(json.dumps(out, indent=2))
print(json.dumps({k: out[k] for k in ("unit_cost_cpu_s", "same_selection", "same_scores", "speedup_cpu", "speedup_wall",
                                  "work_ratio")}))
