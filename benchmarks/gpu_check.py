"""GPU check in one command (`make gpu-check`): the embedded model end to end on a GPU, compared with the CPU.

Three runs of the same configuration through `lp.run.run` (LinearPatch block selection, `patch=auto` over
every training-free kind (so each kind is fitted and verified on held-out windows), `distill=quick`,
WikiText-2 PPL, `qa_quick`, `patch.save=true`, whose save is reloaded and checked by `lp.export`):

  * `reference`: the whole model on `--reference-device` (default cpu);
  * `device`: the whole model on `--device` (default cuda), loaded straight there;
  * `sequential`: `model.onload=sequential` on `--device`: one decoder layer at a time on the device.

Checks (tolerances stated, relative unless noted): the removed layers are identical in the three runs;
every kind's held-out NLL and every PPL agree within `--tol-device` (default 2e-2: another device's
half-precision kernels sum in another order) between `device` and `reference`, and within `--tol-onload`
(default 1e-3: the same kernels on the same device; offloading moves weights, not arithmetic) between
`sequential` and `device`; QA accuracies within `--tol-qa` absolute (default 0.1: a few examples of
`--qa-limit` may flip); each run saved a model that reloads (`result.export`). The JSON report
(`--out`, default `benchmarks/results/gpu_check.json`) has every figure, time and peak memory per
stage (`result.json["memory"]`) and the verdict; the exit code is 0 only when every check passed.

The suite runs this same script on the CPU with the tiny model (`tests/test_devices.py`), so it cannot rot:
    python benchmarks/gpu_check.py --model tiny_llama --device cpu --qa-tasks piqa --qa-limit 4 --set calib.corpus=ptb ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS = ["none", "scalar", "diag", "rotate", "lstsq", "rotate_outlier", "lstsq_mlp", "rotate_mlp"]


def compose(out: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"paths.output_dir={out}", *overrides])
        qa = hydra_compose("config", overrides=["eval=qa_quick"]).eval.qa  # PPL and QA in one run
    with open_dict(cfg):
        cfg.eval.qa = qa
    return cfg


def one_run(name: str, out: Path, overrides: list[str], args) -> dict:
    from omegaconf import open_dict

    from lp.run import run

    cfg = compose(out / name, overrides)
    with open_dict(cfg):
        cfg.eval.qa.limit = args.qa_limit
        if args.qa_tasks:
            cfg.eval.qa.tasks = args.qa_tasks.split(",")
        cfg.eval.qa.progress = False
    t0 = time.perf_counter()
    r = run(cfg)
    return {"name": name, "overrides": overrides, "wall_s": round(time.perf_counter() - t0, 2),
            "removed": r["pruning"]["removed_layers"], "metrics": r["metrics"],
            "heldout_nll": ((r["patch"].get("verification") or {}).get("nll") or {}),
            "choice": [c.get("kind") for c in (r["patch"].get("verification") or {}).get("choice") or []],
            "distill": {k: (r.get("distill") or {}).get(k) for k in ("steps", "val_loss_final", "skipped")},
            "export": r.get("export"), "timing": r["timing"], "memory": r["memory"], "model": r["model"],
            "warnings": r.get("warnings", [])}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(a: dict, b: dict, tol: float, tol_qa: float) -> list[dict]:
    """Every shared number of runs a and b: [{what, a, b, diff, tol, ok}] (diff relative; QA absolute)."""
    rows = [{"what": "removed layers", "a": a["removed"], "b": b["removed"], "ok": a["removed"] == b["removed"]}]
    for kind in sorted(set(a["heldout_nll"]) & set(b["heldout_nll"])):
        x, y = a["heldout_nll"][kind], b["heldout_nll"][kind]
        rows.append({"what": f"held-out NLL {kind}", "a": x, "b": y, "diff": rel(x, y), "tol": tol, "ok": rel(x, y) <= tol})
    for key in sorted(set(a["metrics"]) & set(b["metrics"])):
        x, y = a["metrics"][key], b["metrics"][key]
        if not isinstance(x, float) or not isinstance(y, float):
            continue
        qa = key.startswith(("qa/", "lm_eval"))
        diff = abs(x - y) if qa else rel(x, y)
        limit = tol_qa if qa else tol
        rows.append({"what": key, "a": x, "b": y, "diff": diff, "tol": limit, "ok": diff <= limit})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reference-device", default="cpu")
    ap.add_argument("--n", type=int, default=None, help="layers to remove (default: L // 6, at least 1)")
    ap.add_argument("--qa-limit", type=int, default=20)
    ap.add_argument("--qa-tasks", default="", help="comma-separated subset of qa_quick's tasks (default: all)")
    ap.add_argument("--tol-device", type=float, default=2e-2)
    ap.add_argument("--tol-onload", type=float, default=1e-3)
    ap.add_argument("--tol-qa", type=float, default=0.1)
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra config overrides for every run (e.g. smaller data for the CPU form in the suite)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("LP_DATA_DIR", str(REPO.parent / "shared" / "data"))

    import torch

    from lp.models import load_config

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu-check: --device {args.device} but no CUDA GPU is visible here", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = compose(Path(tmp), [f"model={args.model}"])
        num_layers = load_config(base_cfg.model).num_hidden_layers
    n = args.n or max(1, num_layers // 6)
    common = [f"model={args.model}", "pruner=linearpatch", f"pruner.n={n}", "patch=auto",
              f"patch.candidates=[{','.join(KINDS)}]", "patch.save=true", "calib=quick", "distill=quick",
              "eval=quick", f"runtime.threads={args.threads}", "progress=false", *args.set]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="lp-gpu-check-") as tmp:
        out = Path(tmp)
        for name, extra in (("reference", [f"model.device={args.reference_device}"]),
                            ("device", [f"model.device={args.device}"]),
                            ("sequential", [f"model.device={args.device}", "model.onload=sequential"])):
            runs[name] = one_run(name, out, common + extra, args)
            print(f"gpu-check: {name} done in {runs[name]['wall_s']:.1f}s: removed {runs[name]['removed']}, "
                  f"metrics {runs[name]['metrics']}", flush=True)
    checks = {"device_vs_reference": compare(runs["device"], runs["reference"], args.tol_device, args.tol_qa),
              "sequential_vs_device": compare(runs["sequential"], runs["device"], args.tol_onload, args.tol_qa)}
    saved = {name: bool(r["export"]) for name, r in runs.items()}
    ok = all(row["ok"] for rows in checks.values() for row in rows) and all(saved.values())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"ok": ok, "model": args.model, "n": n, "device": args.device, "gpu": gpu,
              "reference_device": args.reference_device, "tolerances": {"device": args.tol_device,
              "onload": args.tol_onload, "qa_abs": args.tol_qa}, "saved_and_reloaded": saved,
              "checks": checks, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    for what, rows in checks.items():
        for row in rows:
            if not row["ok"]:
                print(f"gpu-check FAILED {what}: {row}", file=sys.stderr)
    print(f"gpu-check: {'ok' if ok else 'FAILED'} ({args.model} on {gpu or args.device}); report {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
