"""The guard at work on the tiny model with planted massive channels (`tests/planted.py`).

Held-out NLL (8 ramp windows x 32 tokens) of every patch kind at three cuts, the `patch=auto`
choice among all of them, and whether a `patch=rotate` run would warn. The planted model predicts
token + 1 exactly when its ordinary channels have the dense magnitude, so the NLL measures how
well a patch restores it (dense: 0.072). Seconds on a CPU.
Usage: OMP_NUM_THREADS=1 python benchmarks/bench_planted.py   (writes benchmarks/results/planted.md)
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from planted import MASSIVE, planted_model, ramp_windows  # noqa: E402
from test_calib import make_ctx  # noqa: E402

from lp import verify  # noqa: E402
from lp.candidates import fit_candidates, ship  # noqa: E402

KINDS = ["none", "scalar", "diag", "rotate", "lstsq", "rotate_outlier"]
model = planted_model()
ctx = make_ctx(model, ramp_windows(16, 32, 1), {}, batch_size=8)
held = verify.Heldout(model, ramp_windows(8, 32, 2), 8)


def fit_and_verify(removed, patch_cfg):
    """`(patches, result["patch"], warnings)` as `lp.run.make_patches` builds them."""
    cands = fit_candidates(ctx, removed, patch_cfg)
    record, warns = verify.verify_patches(held, cands)
    return (*ship(cands, record, warns), warns)


base = {"candidates": KINDS, "hadamard_fallback_seed": None, "ridge": 1e-4, "outlier_factor": 20.0}
lines = [f"Planted tiny Llama (8 layers, D=64, massive channels {MASSIVE}), dense held-out NLL {held.nll([]):.3f}", "",
         "| n | layers | " + " | ".join(KINDS) + " | auto → choice | patch=rotate warns |",
         "|---" * (len(KINDS) + 4) + "|"]
for n, start in ((3, 3), (5, 2), (7, 1)):
    removed = list(range(start, start + n))
    _, info, _ = fit_and_verify(removed, OmegaConf.create({**base, "kind": "auto", "verify": []}))
    v = info["verification"]
    rot = OmegaConf.create({**base, "kind": "rotate", "verify": ["none", "scalar", "diag", "rotate"]})
    _, _, warns = fit_and_verify(removed, rot)
    lines.append(f"| {n} | {start}–{start + n - 1} | " + " | ".join(f"{v['nll'][k]:.3f}" for k in KINDS)
                 + f" | {v['chosen_nll']:.3f} → {'/'.join(c['kind'] for c in v['choice'])} | {'yes' if warns else 'no'} |")
(REPO / "benchmarks" / "results" / "planted.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
