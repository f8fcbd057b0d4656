"""Cost of one output-KL distillation step (SmolLM2-135M bf16, CPU or CUDA).

Compares, on the same windows (batch 1, bf16 autocast, patch after a removed block [cut, cut+n)):
  * `suffix_fwd_bwd`: a plain forward + backward through the suffix modules alone (patched layer ..
    last layer, final norm; loss = mean of squares, no LM head) -- the floor;
  * `step`: one full `lp.distill` optimisation step: teacher rows from the on-disk cache, cached
    prefix state, suffix forward, LM head at the teacher's k indices, top-k KL, backward, grad
    clip, AdamW;
  * `step_full_head`: the same step with the full [T, V] LM head then gather (what the k-index
    head saves);
  * `full_model_step`: the same step with the whole pruned model as student;
  * `prefix`: the no-grad forward up to the first patch, paid once per window per run (so with
    one epoch the suffix student costs prefix + step per window).
Target: step <= 1.3 x suffix_fwd_bwd, and clearly faster than full_model_step.
Peak memory of a step at batch 1, seqlen 2048 is measured in a fresh subprocess (`--memory`): CPU =
peak RSS during the step (VmHWM reset via /proc/self/clear_refs just before it), CUDA =
max_memory_allocated.

Usage: python benchmarks/bench_distill.py [--seqlen 512] [--windows 3] [--repeats 3] [--cut 20] [--n 5]
Writes (merges into) benchmarks/results/distill.json, one entry per removed block and seqlen.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lp import data, models
from lp import distill as D
from lp.distill.train import Freeze
from lp.hadamard import hadamard
from lp.patch import LinearPatch, find_patches, insert_patches, patch_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=512)
p.add_argument("--windows", type=int, default=3)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--cut", type=int, default=20)
p.add_argument("--n", type=int, default=5)
p.add_argument("--k", type=int, default=50)
p.add_argument("--memory", action="store_true", help="(internal) one step in this process, print peak memory")
p.add_argument("--cache-root", default=None)
args = p.parse_args()


def setup(seqlen, nwin, cache_root):
    model, tok = models.load_model(OmegaConf.load(ROOT / "conf/model/smollm2_135m.yaml"))
    data_root = os.environ.get("LP_DATA_DIR", str(ROOT.parent / "shared/data"))
    windows, _ = data.eval_windows(tok, "wikitext2", "test", seqlen, data_root, max_windows=nwin)
    cache = D.build_teacher(model, windows, len(windows), args.k, {"bench": 1, "seqlen": seqlen, "n": nwin},
                            root=cache_root, progress=False)
    L, dim = models.Decoder(model).num_layers, models.Decoder(model).hidden_size
    models.drop_layers(model, list(range(args.cut, args.cut + args.n)))  # the dense copy is not needed again
    s = 0.8 + 0.4 * torch.rand(dim, generator=torch.Generator().manual_seed(0))
    insert_patches(model, {args.cut: LinearPatch(patch_matrix(s, "rotate", hadamard(dim)), args.cut,
                                                 args.cut + args.n, L).to(next(model.parameters()).device)})
    return model, cache


def tools(model, cache):
    device = next(model.parameters()).device
    suffix = D.Suffix(model)
    params = [q for m in find_patches(model) for q in m.parameters()]
    Freeze.only(model, params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    states = [suffix.prefix(cache.get([i])[0]) for i in range(len(cache))]
    amp = D.resolve_autocast("auto", device)

    def ac():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def update(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def suffix_fwd_bwd(i):
        with ac():
            loss = suffix.hidden(states[i]).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def step(i):
        _, idx, tl = cache.get([i])
        with ac():
            loss = D.topk_kl(suffix.logits_at(suffix.hidden(states[i]), idx.to(device)), tl.to(device))
        update(loss)

    def step_full_head(i):
        _, idx, tl = cache.get([i])
        with ac():
            idx = idx.to(device)
            loss = D.topk_kl(suffix.logits(suffix.hidden(states[i])).gather(-1, idx), tl.to(device))
        update(loss)

    def full_model_step(i):
        ids, idx, tl = cache.get([i])
        with ac():
            loss = D.full_student_loss(model, ids.to(device), idx, tl)
        update(loss)

    def prefix(i):  # no-grad forward up to the first patch (once per window and run)
        suffix.prefix(cache.get([i])[0])

    return {"suffix_fwd_bwd": suffix_fwd_bwd, "step": step, "step_full_head": step_full_head,
            "full_model_step": full_model_step, "prefix": prefix}, device, len(suffix.modules)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


if args.memory:  # one step in a fresh process: peak memory of the step itself
    model, cache = setup(args.seqlen, 1, args.cache_root)
    fns, device, _ = tools(model, cache)
    out = {}
    for name in ("step", "full_model_step"):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            reset_peak_rss()
            before = rss_mb()
        fns[name](0)
        sync(device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
        out[name] = {"before_mb": round(before, 1), "peak_mb": round(peak, 1), "step_extra_mb": round(peak - before, 1)}
    print(json.dumps(out))
    sys.exit(0)

with tempfile.TemporaryDirectory() as tmp:
    model, cache = setup(args.seqlen, args.windows, tmp)
    fns, device, nmods = tools(model, cache)
    for fn in fns.values():  # warm-up (also captures the suffix call arguments)
        fn(0)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):  # interleaved; per window; min and median over everything
        for i in range(len(cache)):
            for name, fn in fns.items():
                sync(device)
                t = time.perf_counter()
                fn(i)
                sync(device)
                times[name].append(time.perf_counter() - t)
    mem = subprocess.run([sys.executable, __file__, "--memory", "--seqlen", "2048", "--cut", str(args.cut),
                          "--n", str(args.n), "--k", str(args.k), "--cache-root", tmp],
                         capture_output=True, text=True, check=True)
    memory = json.loads(mem.stdout.strip().splitlines()[-1])

best = {k: min(v) for k, v in times.items()}
med = {k: statistics.median(v) for k, v in times.items()}
out = {
    "model": "smollm2_135m", "dtype": "bfloat16", "device": str(device), "threads": torch.get_num_threads(),
    "removed": [args.cut, args.cut + args.n], "suffix_modules": nmods, "k": args.k,
    "seqlen": args.seqlen, "windows": args.windows, "repeats": args.repeats,
    "seconds_min": best, "seconds_median": med,
    "ratio_step_over_suffix_fwd_bwd": {"min": best["step"] / best["suffix_fwd_bwd"],
                                       "median": med["step"] / med["suffix_fwd_bwd"]},
    "speedup_step_vs_full_model_step": {"min": best["full_model_step"] / best["step"],
                                        "median": med["full_model_step"] / med["step"]},
    "speedup_step_vs_step_full_head": {"min": best["step_full_head"] / best["step"],
                                       "median": med["step_full_head"] / med["step"]},
    "speedup_one_epoch_prefix_plus_step_vs_full_model_step": {
        "min": best["full_model_step"] / (best["step"] + best["prefix"]),
        "median": med["full_model_step"] / (med["step"] + med["prefix"])},
    "target_ratio": 1.3,
    "memory_batch1_seqlen2048": {"kind": "cuda max_memory_allocated" if device.type == "cuda" else
                                 "cpu peak RSS of the process during the step (VmHWM after clear_refs); "
                                 "includes the bf16 model (~270 MB) and data", **memory},
}
out["pass"] = out["ratio_step_over_suffix_fwd_bwd"]["min"] <= out["target_ratio"]
dest = ROOT / "benchmarks" / "results" / "distill.json"  # one entry per removed block and seqlen
dest.parent.mkdir(exist_ok=True)
results = json.loads(dest.read_text()) if dest.is_file() else {}
results = results if "runs" in results else {"runs": {}}
results["runs"][f"removed_{args.cut}_{args.cut + args.n}_seqlen{args.seqlen}"] = out
dest.write_text(json.dumps(results, indent=2))
print(json.dumps(out, indent=2))
