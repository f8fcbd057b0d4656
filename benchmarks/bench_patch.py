"""Prefill latency of the pruned SmolLM2 with vs without its LinearPatch (same pruned model).

Prefill = one forward over a 2048-token prompt that fills the KV cache and returns the last
token's logits (what `generate` does first). The pruned model drops layers [20, 25) (n = 5) and
the patch P = H diag(s) H^T sits before the next kept layer; runs alternate patched / unpatched
(`strip_patches` / `insert_patches` on the same model) and the minimum and median of `--repeats`
are kept. Target: patched <= 1.03 x unpatched. The isolated patch op (x.float() @ P).to(bf16) on
[2048, 576] is timed as well.
Usage: flock /tmp/lp-heavy.lock python benchmarks/bench_patch.py [--tokens 2048] [--repeats 7]
Writes benchmarks/results/patch.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lp import models
from lp.hadamard import hadamard
from lp.patch import LinearPatch, insert_patches, patch_matrix, strip_patches

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=2048)
p.add_argument("--repeats", type=int, default=7)
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
cfg = OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml")
model, _ = models.load_model(cfg)
L, D = models.Decoder(model).num_layers, models.Decoder(model).hidden_size
a, b = 20, 25
models.drop_layers(model, range(a, b))
g = torch.Generator().manual_seed(0)
s = 0.5 + 1.5 * torch.rand(D, generator=g)
patch = LinearPatch(patch_matrix(s, "rotate", hadamard(D, dtype=torch.float64)), a, b, L)
ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=g)


@torch.inference_mode()
def prefill():
    t = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t


prefill()  # warm-up
times = {"unpatched": [], "patched": []}
for _ in range(args.repeats):
    times["unpatched"].append(prefill())
    insert_patches(model, {a: patch})
    times["patched"].append(prefill())
    strip_patches(model)

x = torch.randn(args.tokens, D, dtype=torch.bfloat16)
with torch.inference_mode():
    patch(x)
    t = time.perf_counter()
    for _ in range(20):
        patch(x)
    op = (time.perf_counter() - t) / 20

res = {
    "model": cfg.name, "dtype": str(next(model.parameters()).dtype), "tokens": args.tokens,
    "removed": list(range(a, b)), "threads": torch.get_num_threads(), "seconds": times,
    "min": {k: min(v) for k, v in times.items()}, "median": {k: statistics.median(v) for k, v in times.items()},
    "patch_op_seconds": op,
}
res["ratio_min"] = res["min"]["patched"] / res["min"]["unpatched"]
res["ratio_median"] = res["median"]["patched"] / res["median"]["unpatched"]
res["target"] = "patched prefill <= 1.03 x unpatched"
res["pass"] = res["ratio_min"] <= 1.03
out = REPO / "benchmarks/results/patch.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
