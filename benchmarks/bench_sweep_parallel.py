"""Sweep throughput: one job at a time vs two joblib workers, with and without the thread budget.

The `smollm2_quick` grid (SmolLM2-135M bf16; 2 pruners x n in {2, 4} x patch {none, rotate} = 8 jobs;
`--subset` keeps pruner=shortgpt: 4 jobs; plus the Dense job the dense_first sweeper adds) through the real CLI (`python run.py sweeps=smollm2_quick`),
once per setting:
  sequential/auto     basic launcher, runtime.threads=auto (= all cores of this process)
  sequential/1        basic launcher, runtime.threads=1
  joblib2/auto        hydra/launcher=parallel (2 workers), runtime.threads=auto (= cores // 2)
  joblib2/off         hydra/launcher=parallel, runtime.threads=null and OMP_NUM_THREADS=MKL_NUM_THREADS=
                      <cores> in the environment: every job with all the cores' threads (what
                      submitit_local, or thread variables exported for a single run, give each worker
                      without the budget; with neither variable set, joblib itself gives its workers
                      MKL_NUM_THREADS = cores // n_jobs, which torch's default follows)
Each setting starts from its own cache folder holding only the converted model (hard links of a warm
one), so calibration and selection scores are computed afresh by each sweep, as in a first run.
jobs/minute = finished jobs / sweep wall time (Python start, model loads and the aggregation included);
cpu_s = user + system CPU seconds of the sweep and its workers (spinning OpenMP threads count too).

The mechanism, measured directly: bf16 matmul throughput with 1 and 2 threads, alone and while a
competing process keeps one core busy (a pure-Python spin loop started by this script).

The machine may be shared: the load average before/after each measurement is recorded; numbers taken
under contention are labelled so (`contended`).
Usage: flock /tmp/lp-heavy.lock python benchmarks/bench_sweep_parallel.py [--subset] [--only joblib2/auto,...]
Writes benchmarks/results/sweep_parallel.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "sequential/auto": ([], "auto", None),
    "sequential/1": ([], "1", None),
    "joblib2/auto": (["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], "auto", None),
    "joblib2/off": (["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], "null", "cores"),
}
MATMUL = """
import sys, time, torch
threads, seconds, m, k = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads); a = torch.randn(m, k, dtype=torch.bfloat16); b = torch.randn(k, k, dtype=torch.bfloat16)
for _ in range(3): a @ b
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds: a @ b; n += 1
print(n / (time.perf_counter() - t0))
"""
SHAPES = {"large 1024x1024x1024": (1024, 1024), "small 16x576x576": (16, 576)}  # (m, k): [m,k] @ [k,k]


def env_for(cache: Path, omp: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(LP_CACHE_DIR=str(cache), LP_DATA_DIR=env.get("LP_DATA_DIR", str(REPO.parent / "shared" / "data")),
               HYDRA_FULL_ERROR="0")
    if omp:  # torch's default reads both; joblib's workers get MKL_NUM_THREADS=cores // n_jobs otherwise
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(os.cpu_count()) if omp == "cores" else omp
    return env


def cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def warm_cache(root: Path) -> Path:
    """A cache folder holding the converted model only: one dense run with one PPL window."""
    warm = root / "warm"
    cli(["model=smollm2_135m", "eval=quick", "eval.ppl.max_windows=1", "eval.ppl.progress=false",
         f"hydra.run.dir={root / 'warmup'}"], env_for(warm, "1"), root)
    return warm


def run_sweep(name: str, root: Path, warm: Path, grid: list[str]) -> dict:
    launcher, setting, omp = SETTINGS[name]
    cache = root / "cache" / name.replace("/", "_")
    shutil.copytree(warm, cache, copy_function=os.link)  # hard links: the model only, nothing else cached
    sweep = root / "sweeps" / name.replace("/", "_")
    load0 = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cli(["sweeps=smollm2_quick", *grid, *launcher, f"runtime.threads={setting}", "resume=false",
         "eval.ppl.progress=false", f"hydra.sweep.dir={sweep}"], env_for(cache, omp), root)
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # the sweep and its joblib workers
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    ok = [j for j in jobs if j["status"] == "ok"]
    return {"setting": name, "launcher": launcher or ["basic"], "runtime.threads": setting,
            "OMP_NUM_THREADS": env_for(cache, omp).get("OMP_NUM_THREADS"),
            "threads_per_job": sorted({j["runtime"]["threads"] for j in jobs}),
            "jobs": len(jobs), "ok": len(ok), "wall_s": round(wall, 1),
            "jobs_per_min": round(60 * len(ok) / wall, 3), "cpu_s": round(cpu, 1),
            "cpu_s_per_job": round(cpu / max(len(ok), 1), 1),
            "job_total_s": round(sum(j["timing"]["total"] for j in jobs), 1),
            "job_select_s": round(sum(j["timing"].get("select", 0) for j in jobs), 1),  # calibration inside
            "ppl": {j["name"]: j["metrics"]["ppl/wikitext2"] for j in ok},
            "loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def matmul_rate(shape: str, threads: int, seconds: float, busy: bool) -> dict:
    """bf16 matmuls/s of `shape` with `threads` torch threads; with `busy`, while a spin loop holds a
    core. Small matmuls (one decode-like step of a 576-wide layer) pay a thread barrier per op."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        load0 = os.getloadavg()[0]
        out = subprocess.run([sys.executable, "-c", MATMUL, str(threads), str(seconds), *map(str, SHAPES[shape])],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return {"shape": shape, "threads": threads, "competing_busy_process": busy, "matmuls_per_s": round(float(out.stdout), 1),
            "loadavg_1min": round(load0, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--subset", action="store_true", help="pruner=shortgpt only: 4 jobs instead of 8")
    p.add_argument("--smoke", action="store_true", help="2 jobs (shortgpt, n=2), for checking the script")
    p.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings to run")
    p.add_argument("--matmul-seconds", type=float, default=5.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep_parallel.json"))
    args = p.parse_args()
    grid = ["pruner=shortgpt", "pruner.n=2"] if args.smoke else ["pruner=shortgpt"] if args.subset else []

    matmul = [matmul_rate(shape, t, args.matmul_seconds, busy) for shape in SHAPES for busy in (False, True)
              for t in (1, 2)]
    for m in matmul:
        print(f"matmul {m['shape']:21} threads={m['threads']}  busy competitor={m['competing_busy_process']!s:5}  "
              f"{m['matmuls_per_s']:8.1f}/s  (load {m['loadavg_1min']})", flush=True)
    sweeps = []
    with tempfile.TemporaryDirectory(prefix="lp-bench-sweep-") as tmp:
        root = Path(tmp)
        warm = warm_cache(root)
        for name in args.only.split(","):
            sweeps.append(run_sweep(name, root, warm, grid))
            s = sweeps[-1]
            print(f"{name:16} threads/job={s['threads_per_job']}  {s['ok']}/{s['jobs']} ok  {s['wall_s']:7.1f}s  "
                  f"{s['jobs_per_min']:.2f} jobs/min  cpu {s['cpu_s_per_job']}s/job  (load {s['loadavg_1min']})", flush=True)
    ppls = [s["ppl"] for s in sweeps if s["ppl"]]
    spread = max((abs(a[k] - b[k]) / b[k] for a in ppls for b in ppls for k in a.keys() & b.keys()), default=0.0)
    out = {"host_cores": os.cpu_count(), "grid": grid or "smollm2_quick (full)",
           "contended": max(s["loadavg_1min"][0] for s in sweeps) > os.cpu_count() if sweeps else None,
           "matmul_bf16": matmul, "sweeps": sweeps, "ppl_max_relative_spread": spread,
           "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
