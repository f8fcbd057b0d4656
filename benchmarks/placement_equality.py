"""Same run, three placements, on the embedded SmolLM2-135M: the removed layers and PPL must agree.

    python benchmarks/placement_equality.py [--threads 2]
runs `pruner=linearpatch pruner.n=5 patch=rotate calib=quick eval=quick` with the whole model in memory
(default), with `model.onload=sequential` (decoder layers on disk, one module at a time in memory) and
with `model.device_map=auto model.max_memory={cpu:150MB}` (accelerate keeps what fits in 150 MB and
offloads the rest to disk), each with an empty calibration cache, and writes
`benchmarks/results/placement_equality.json`: removed layers, WikiText-2 PPL, held-out NLL of the
patch, relative differences to the default, wall time and peak RSS per stage. Goal (issue 22):
identical layers, PPL relative difference <= 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = ["pruner=linearpatch", "pruner.n=5", "patch=rotate", "calib=quick", "eval=quick", "progress=false"]
PLACEMENTS = {"default": [], "sequential": ["model.onload=sequential"],
              "auto_offloaded": ["model.device_map=auto", "model.max_memory={cpu:150MB}"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="2")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "placement_equality.json"))
    args = ap.parse_args()
    os.environ.setdefault("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))
    from hydra import compose, initialize_config_dir

    from lp.run import run

    rows = {}
    with tempfile.TemporaryDirectory(prefix="lp-placement-") as tmp:
        for name, extra in PLACEMENTS.items():
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=[f"paths.output_dir={tmp}/{name}", f"paths.cache_dir={tmp}/cache-{name}",
                                                   f"runtime.threads={args.threads}", *BASE, *extra])
            r = run(cfg)
            nll = (r["patch"].get("verification") or {}).get("nll") or {}
            rows[name] = {"overrides": BASE + extra, "removed": r["pruning"]["removed_layers"],
                          "ppl": r["metrics"]["ppl/wikitext2"], "heldout_nll_rotate": nll.get("rotate"),
                          "device_map": r["model"].get("device_map"), "timing": r["timing"], "memory": r["memory"]}
    ref = rows["default"]
    for row in rows.values():
        row["same_layers"] = row["removed"] == ref["removed"]
        row["ppl_rel_diff"] = abs(row["ppl"] - ref["ppl"]) / ref["ppl"]
        if row["heldout_nll_rotate"] is not None and ref["heldout_nll_rotate"] is not None:
            row["heldout_nll_rel_diff"] = abs(row["heldout_nll_rotate"] - ref["heldout_nll_rotate"]) / ref["heldout_nll_rotate"]
    ok = all(r["same_layers"] and r["ppl_rel_diff"] <= 1e-3 for r in rows.values())
    Path(args.out).write_text(json.dumps({"ok": ok, "goal": "same layers, PPL rel. diff <= 1e-3", "runs": rows},
                                         indent=2, default=str))
    for name, r in rows.items():
        offloaded = sum(v == "disk" for v in (r["device_map"] or {}).values())
        print(f"{name:15s} removed {r['removed']}  ppl {r['ppl']:.6f}  rel diff {r['ppl_rel_diff']:.2e}  "
              f"modules on disk {offloaded}  total {r['timing']['total']:.1f}s")
    print("ok" if ok else "MISMATCH", "->", args.out)


if __name__ == "__main__":
    main()
