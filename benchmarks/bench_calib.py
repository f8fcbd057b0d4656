"""One calibration pass (+ selection and scales for every n) vs a plain forward over the same tokens.

SmolLM2-135M in bf16, calibration windows from WikiText-2 tokenized train (as `calib=wikitext2_tok`).
Target: `lp.calib.collect` + block selection for all n + scales (diag and rotate) of each selected
block <= 1.15x the time of the plain backbone forward (`model.model(input_ids)`: all layers + final
norm, no lm_head) over the same windows and batch size. The full LM forward (with logits) is timed too.
Runs are interleaved and the minimum of `--repeats` is kept (the CPU is shared).
Usage: flock /tmp/lp-heavy.lock python benchmarks/bench_calib.py [--nsamples 16] [--seqlen 2048]
Writes benchmarks/results/calib.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lp import data, models
from lp.calib import collect
from lp.hadamard import Rotation

p = argparse.ArgumentParser()
p.add_argument("--nsamples", type=int, default=16)
p.add_argument("--seqlen", type=int, default=2048)
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--repeats", type=int, default=2)
args = p.parse_args()

REPO = Path(__file__).resolve().parents[1]
cfg = OmegaConf.load(REPO / "conf/model/smollm2_135m.yaml")
model, tok = models.load_model(cfg)
dec = models.Decoder(model)
root = os.environ.get("LP_DATA_DIR", str(REPO.parent / "shared/data"))
ids, _ = data.tokenized(tok, "wikitext2_tok", "train", root)
windows, _ = data.calibration_windows(ids, args.nsamples, args.seqlen, seed=2)
B = args.batch_size


@torch.inference_mode()
def backbone():
    for i in range(0, len(windows), B):
        dec.backbone(input_ids=windows[i:i + B], use_cache=False)


@torch.inference_mode()
def full_lm():
    for i in range(0, len(windows), B):
        model(input_ids=windows[i:i + B], use_cache=False)


def calibrate():
    stats = collect(model, windows, B, Rotation(dec.hidden_size))
    for n in range(1, dec.num_layers):
        scores = stats.block_scores(n)
        a = int(scores.argmax())
        stats.scales(a, a + n, "diag"), stats.scales(a, a + n, "rotate")
    return stats


times = {"backbone": [], "full_lm": [], "calibration": []}
for _ in range(args.repeats):
    for name, fn in (("backbone", backbone), ("calibration", calibrate), ("full_lm", full_lm)):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
best = {k: min(v) for k, v in times.items()}
res = {
    "model": cfg.name, "dtype": str(next(model.parameters()).dtype), "windows": args.nsamples,
    "seqlen": args.seqlen, "batch_size": B, "threads": torch.get_num_threads(), "seconds": times,
    "best_seconds": best,
    "ratio_vs_backbone": best["calibration"] / best["backbone"],
    "ratio_vs_full_lm": best["calibration"] / best["full_lm"],
    "target": "calibration <= 1.15 x backbone forward",
}
res["pass"] = res["ratio_vs_backbone"] <= 1.15
out = REPO / "benchmarks/results/calib.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
