"""Peak GPU memory of calibration and PPL for Llama-3-8B and Llama-3-70B in each placement, estimated.

Worked from exact parameter counts (the architectures built on the meta device: no memory) and the sizes
of what lp holds on the device (see `lp.calib.collect`, `lp.replay.Replay.walk`, `lp.evaluate.ppl`):
  * weights (bf16): the whole model (default), or embeddings + final norm + head plus the largest module
    accelerate onloads at a time (`onload=sequential`: its hooks sit on each leaf module);
  * calibration (batch 1, T = 2048 tokens): the token- and channel-normalised stacks [L+1, 1, T, D] float32
    (two), the per-window abs-means [W, L+1, D] float32 (two with the rotation) for W = 128 windows, the
    stream h [1, T, D] in bf16 and float32, and one layer's largest activation (the MLP's [T, I] x 3, bf16);
  * PPL (batch 1, T = 2048): the logits [T, V] in bf16 plus their float32 cross-entropy copy.
Not counted: the CUDA context (~0.5 GB) and the allocator's fragmentation (typically 5-10 %).
The figures the CPU can check (per-layer weights held by the sequential mode) are in
`benchmarks/results/onload.json`; this is arithmetic, written out so it can be checked.

    python benchmarks/gpu_memory_estimate.py   ->  benchmarks/results/gpu_memory_estimate.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
GB = 2**30
MODELS = {
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3_70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def estimate(name: str, kw: dict, T: int = 2048, W: int = 128) -> dict:
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw), dtype=torch.bfloat16)
    L, D, F, V = kw["num_hidden_layers"], kw["hidden_size"], kw["intermediate_size"], kw["vocab_size"]
    total = sum(p.numel() for p in model.parameters()) * 2
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 2
    leaf = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.model.layers[0].modules()) * 2
    outside = total - L * layer
    calib = 2 * (L + 1) * T * D * 4 + 2 * W * (L + 1) * D * 4 + T * D * (2 + 4) + 3 * T * F * 2
    ppl = T * V * (2 + 4)
    default = {"weights": total, "calibration": total + calib, "ppl": total + ppl}
    seq = {"weights": outside + leaf, "calibration": outside + leaf + calib, "ppl": outside + leaf + ppl}
    gb = lambda d: {k: round(v / GB, 1) for k, v in d.items()}  # noqa: E731
    return {"model": name, "layers": L, "weights_gb": round(total / GB, 1), "layer_gb": round(layer / GB, 2),
            "largest_module_gb": round(leaf / GB, 2), "embeddings_head_norm_gb": round(outside / GB, 2),
            "calibration_buffers_gb": round(calib / GB, 2), "ppl_logits_gb": round(ppl / GB, 2),
            "default_peak_gb": gb(default), "sequential_peak_gb": gb(seq),
            "device_map_auto_2gpu_weights_per_gpu_gb": round(total / 2 / GB, 1)}


def main() -> None:
    rows = [estimate(name, kw) for name, kw in MODELS.items()]
    out = REPO / "benchmarks" / "results" / "gpu_memory_estimate.json"
    out.write_text(json.dumps({"assumptions": __doc__.split("\n\n")[1], "rows": rows}, indent=2))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
