"""Peak memory of Taylor+ scoring (`lp.pruners.taylor.taylor_scores`) vs model width: layer by layer
(`pruner.layers_per_pass=1`, the default) against every candidate in one pass (`null`, the former code).

Synthetic Llama models built in-process (`lp.models.tiny_model`: float32, 12 layers -> 6 Taylor+
candidates, 4 heads / 2 KV heads, intermediate = 2 x hidden, vocab 259) of growing hidden size,
scored on 4 random windows of 64 tokens, micro-batch 1. Each measurement runs in a fresh
subprocess with every allocation >= 64 KiB mmapped (freed memory goes back to the OS), and reports
the peak resident set (VmHWM, reset right before the call) minus the resident set before it: the
scoring's own working set (gradient sums, transient gradients, activations). Expected: about one
layer's float32 gradients with layers_per_pass=1, about the six candidates' with null.
Also checks that both settings give the same scores (max relative difference).
Usage (light: ~1 min on a loaded 2-core machine):
    python benchmarks/bench_taylor_memory.py [--widths 256 512 1024 1536] [--threads 1]
Writes benchmarks/results/taylor_memory.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS, CANDIDATES = 12, list(range(4, 10))  # Taylor+: never the first 4 and the last 2


def measure(width: int, layers_per_pass, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory import peak_rss_mb, reset_peak_rss, rss_mb

    from lp.models import Decoder, tiny_model
    from lp.pruners.taylor import taylor_scores

    torch.set_num_threads(threads)
    model = tiny_model("llama", num_layers=LAYERS, hidden_size=width)
    windows = torch.randint(0, 259, (4, 64), generator=torch.Generator().manual_seed(0))
    layer_mb = sum(p.numel() for p in Decoder(model).layers[4].parameters()) * 4 / 2**20
    taylor_scores(model, windows[:1, :8], CANDIDATES[-1:], layers_per_pass=1)  # warm up kernels / allocator
    before = rss_mb()
    reset_peak_rss()
    t0 = time.process_time()
    scores = taylor_scores(model, windows, CANDIDATES, micro_batch=1, layers_per_pass=layers_per_pass)
    cpu = time.process_time() - t0
    peak = peak_rss_mb() - before
    return {"hidden_size": width, "layers_per_pass": layers_per_pass, "layer_fp32_grad_mb": round(layer_mb, 2),
            "candidates_fp32_grad_mb": round(layer_mb * len(CANDIDATES), 2),
            "weights_mb": round(sum(p.numel() for p in model.parameters()) * 4 / 2**20, 1),
            "peak_over_before_mb": round(peak, 1), "peak_in_layers": round(peak / layer_mb, 2),
            "cpu_s": round(cpu, 2), "scores": scores}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 1536])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, help="internal: WIDTH LAYERS_PER_PASS (or none) in this process")
    args = ap.parse_args()
    if args.one:
        lpp = None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(measure(int(args.one[0]), lpp, args.threads)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": str(REPO)}
    rows = []
    for width in args.widths:
        pair = {}
        for lpp in ("1", "none"):
            out = subprocess.run([sys.executable, __file__, "--one", str(width), lpp, "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            pair[lpp] = json.loads(out.strip().splitlines()[-1])
        a, b = pair["1"]["scores"], pair["none"]["scores"]
        diff = max(abs(a[k] - b[k]) / abs(b[k]) for k in b)
        for r in pair.values():
            r.pop("scores")
            r["max_rel_diff_scores_vs_one_pass"] = diff
            rows.append(r)
            print(f"hidden {width:5d}  layers_per_pass={str(r['layers_per_pass']):4s}  peak +{r['peak_over_before_mb']:8.1f} MB"
                  f" = {r['peak_in_layers']:5.2f} layers' fp32 grads ({r['layer_fp32_grad_mb']:.1f} MB each)  "
                  f"cpu {r['cpu_s']:.1f}s  scores rel diff {diff:.1e}", flush=True)
    result = {"what": __doc__.split("\n")[0], "setup": {"layers": LAYERS, "candidates": CANDIDATES, "windows": [4, 64],
                                                      "micro_batch": 1, "dtype": "float32", "threads": args.threads},
              "rows": rows}
    out = REPO / "benchmarks" / "results" / "taylor_memory.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
