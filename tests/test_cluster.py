"""Cluster robustness (issue 23): best-effort cache locks on shared filesystems, preemption and
timeouts in sweeps, one GPU per parallel job, memory of the gradient pruners."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CALIB, DATA, ENV, REPO, TINY

from lp import cache, validate


# ----------------------------------------------------------------------------- cache locking
def _unlocked_fetch(root: str, out: str, mode: str = "off") -> None:
    """One builder of the entry `slow/{k: 1}`, all builders at the same time. mode `off`: locking off;
    `noop`: locking on, but flock silently grants every lock (Lustre -o localflock across nodes)."""
    if mode == "noop":
        fcntl.flock = lambda fd, op: None

    def build(d: Path) -> None:
        with open(Path(root) / "builds.log", "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.5)  # both processes are inside build while the entry is missing
        (d / "v.json").write_text(json.dumps({"pid": os.getpid(), "payload": list(range(1000))}))

    with cache.using(root, locking=mode != "off"):
        got = cache.fetch("slow", {"k": 1}, build, load=lambda p: json.loads((p / "v.json").read_text()))
    Path(out).write_text(json.dumps({"value": got.value, "path": str(got.path)}))


@pytest.mark.parametrize("mode, builders", [("off", 2), ("noop", 3)])
def test_unlocked_builders_all_succeed_with_one_valid_entry(tmp_path, mode, builders):
    """Before: with a lock that grants everything, each writer took the others' temporary folders for
    leftovers of dead writers and removed them (FileNotFoundError in their build)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_unlocked_fetch, args=(str(tmp_path), str(tmp_path / f"out{i}"), mode))
             for i in range(builders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * builders
    assert len((tmp_path / "builds.log").read_text().split()) == builders  # no working lock: all built
    outs = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(builders)]
    entry = Path(outs[0]["path"])
    assert all(o["path"] == str(entry) for o in outs)
    assert cache.check(entry, cache.normal_key({"k": 1})) is None  # manifest, key and sizes all agree
    kept = json.loads((entry / "v.json").read_text())
    assert all(o["value"]["payload"] == kept["payload"] for o in outs)
    assert sorted(p.name for p in (tmp_path / "slow").iterdir()) == [entry.name]  # no temporary leftovers
    assert (tmp_path / ".locks").exists() == (mode == "noop")  # locking off: no lock file was even created


def _refuse_flock(monkeypatch):
    real = fcntl.flock

    def flock(fd, op):
        if op & fcntl.LOCK_EX and not op & fcntl.LOCK_NB:
            raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd, Lustre noflock
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def _refuse_open(monkeypatch):
    real = os.open

    def open_(p, flags, *a, **k):
        if str(p).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(p))  # another user's lock file, read-only
        return real(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("fault, message", [(_refuse_flock, "the filesystem refused the lock"),
                                            (_refuse_open, "cannot open the lock file")])
def test_a_lock_that_cannot_be_taken_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog, fault, message):
    monkeypatch.setattr(cache, "_lock_warned", set())
    fault(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lp.cache"), cache.using(tmp_path):
        got = cache.fetch("x", {"a": 1}, lambda d: (d / "v").write_text("1"), load=lambda p: (p / "v").read_text())
        again = cache.fetch("x", {"a": 1}, lambda d: pytest.fail("rebuilt"), load=lambda p: (p / "v").read_text())
        stored = cache.store("x", {"a": 2}, lambda d: (d / "v").write_text("2"))
    assert (got.value, got.hit, again.value, again.hit) == ("1", False, "1", True)
    assert cache.check(stored, cache.normal_key({"a": 2})) is None
    assert caplog.text.count(message) == 1, caplog.text  # warned once per process, not per entry


def test_the_lock_file_is_opened_read_write(tmp_path, monkeypatch):
    """NFS emulates flock with POSIX locks, which need a writable descriptor (no read-only fallback)."""
    seen = []
    real = os.open

    def open_(p, flags, *a, **k):
        if str(p).endswith(".lock"):
            seen.append(flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR))
        return real(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", open_)
    with cache.using(tmp_path):
        cache.fetch("x", {"a": 1}, lambda d: (d / "v").write_text("1"), load=lambda p: (p / "v").read_text())
    assert seen and set(seen) == {os.O_RDWR}


def test_replacing_a_bad_entry_without_a_lock(tmp_path, caplog):
    with cache.using(tmp_path, locking=False):
        path = cache.fetch("x", {"a": 1}, lambda d: (d / "v").write_text("1"), load=lambda p: (p / "v").read_text()).path
        (path / "v").write_text("corrupted, longer")  # size no longer matches the manifest
        with caplog.at_level(logging.WARNING, logger="lp.cache"):
            got = cache.fetch("x", {"a": 1}, lambda d: (d / "v").write_text("1"), load=lambda p: (p / "v").read_text())
    assert "truncated or changed" in caplog.text
    assert (got.value, got.hit) == ("1", False) and cache.check(path, cache.normal_key({"a": 1})) is None
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [path.name]


def test_cache_locking_takes_only_booleans(cfg_factory):
    validate.settings(cfg_factory("paths.cache_locking=false"))
    with pytest.raises(ValueError, match="paths.cache_locking"):
        validate.settings(cfg_factory("paths.cache_locking=no"))


@pytest.mark.slow
def test_two_fresh_cache_runs_at_once_without_locking(tmp_path):
    root = tmp_path / "cache"
    args = [*TINY, *CALIB, "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "pruner=shortgpt", "pruner.n=2",
            "patch=rotate", "runtime.threads=1", f"paths.cache_dir={root}", "paths.cache_locking=false"]
    procs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={tmp_path / str(i)}"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / str(i) / "result.json").read_text()) for i in range(2)]
    assert results[0]["metrics"] == results[1]["metrics"]  # same thread count, same inputs: same arithmetic
    entries = [m.parent for m in root.glob("*/*/manifest.json")]
    assert any(e.parent.name == "calib" for e in entries), entries
    for e in entries:  # every entry complete and consistent with its own manifest
        assert cache.check(e, json.loads((e / "manifest.json").read_text())["key"]) is None, e
    assert not list(root.glob("*/.*.tmp-*")) and not (root / ".locks").exists()


# ----------------------------------------------------------------------------- preemption, timeouts, lost jobs
SWEEP = [*TINY, "pruner=none", "runtime.threads=1", "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64",
         "eval.ppl.max_windows=2000"]  # 3 dense jobs (no calibration), each ~5 s of PPL (2000 x 64 tokens) to interrupt


def _launch(tmp_path: Path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115 - the child writes it; read back by _log
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                            cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(tmp_path: Path) -> str:
    return (tmp_path / "sweep.log").read_text()


def _wait(proc: subprocess.Popen, pred, what: str, timeout: float = 240):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _results(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/result.json")}


def _submitit_jobs_in_eval(sweep: Path) -> list[int]:
    """submitit_local job ids (= controller pids) whose job is evaluating PPL (mid-run)."""
    return [int(f.parent.name) for f in sweep.glob(".submitit/*/*_0_log.out") if "[eval_ppl]" in f.read_text()]


def _task(controller: int) -> int:
    """The job process submitit_local's controller started."""
    return int(Path(f"/proc/{controller}/task/{controller}/children").read_text().split()[0])


@pytest.mark.slow
def test_basic_sweep_sigterm_after_the_first_job_writes_the_tables_and_exits_nonzero(tmp_path):
    proc = _launch(tmp_path, *SWEEP, "seed=0,1,2")
    _wait(proc, lambda: "job 2/3" in _log(tmp_path) and "[eval_ppl]" in _log(tmp_path).split("job 2/3")[1],
          "job 2 to evaluate")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 128 + signal.SIGTERM, _log(tmp_path)
    sweep, log = tmp_path / "sweep", _log(tmp_path)
    results = _results(sweep)
    assert results[0]["status"] == "ok" and results[1]["status"] == "failed" and "SIGTERM" in results[1]["error"]
    assert 2 not in results  # never started
    assert "| Dense |" in (sweep / "table.md").read_text()  # the finished job's row
    assert f"python -m lp aggregate {sweep}" in log and "interrupted (SIGTERM)" in log, log


@pytest.mark.slow
def test_submitit_sweep_survives_a_terminated_and_a_preempted_job(tmp_path):
    """submitit_local, 3 jobs at once: SIGTERM to one (recorded failed, its result still reaches the
    launcher), submitit's preemption signal USR2 to another (checkpointed, requeued, runs again, ok)."""
    proc = _launch(tmp_path, *SWEEP, "seed=0,1,2", "hydra/launcher=submitit_local")
    sweep = tmp_path / "sweep"
    jobs = _wait(proc, lambda: (j := _submitit_jobs_in_eval(sweep)) and len(j) >= 2 and j, "two jobs mid-run")
    os.kill(jobs[0], signal.SIGTERM)  # the controller forwards it to its job, as SLURM's scancel would
    os.kill(_task(jobs[1]), signal.SIGUSR2)  # submitit's preemption / timeout signal
    code = proc.wait(300)
    log, results = _log(tmp_path), _results(sweep)
    assert code == 1, log
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == ["failed", "ok", "ok"], results
    (failed,) = [r for r in results.values() if r["status"] == "failed"]
    assert "SIGTERM" in failed["error"]
    requeued = (sweep / ".submitit" / str(jobs[1]) / f"{jobs[1]}_0_log.out").read_text()
    assert "Requeued job" in requeued and requeued.count("[load]") == 2  # ran again from the start
    assert (sweep / "table.md").is_file() and "sweep adhoc done: 1 failed, 2 ok" in log
    assert f"python -m lp aggregate {sweep}" in log


def _submitit_job(sweep: Path, num: int) -> int | None:
    """The submitit_local job id (= controller pid) of sweep job `num` (1-based) once it evaluates PPL."""
    for f in sweep.glob(".submitit/*/*_0_log.out"):
        text = f.read_text()
        if f"job {num}/" in text and "[eval_ppl]" in text:
            return int(f.parent.name)
    return None


@pytest.mark.slow
def test_a_sweep_whose_launcher_raises_still_writes_the_tables(tmp_path):
    """The plugin's submitit_local: a job killed outright (SIGKILL: no result) makes the launcher raise
    and Hydra skip its end-of-sweep callbacks; run.py still writes the tables of what finished."""
    proc = _launch(tmp_path, *SWEEP, "seed=0,1", "hydra/launcher=submitit_local")
    sweep = tmp_path / "sweep"
    job = _wait(proc, lambda: _submitit_job(sweep, 2), "job 2 mid-run")
    os.kill(_task(job), signal.SIGKILL)
    code = proc.wait(300)
    log = _log(tmp_path)
    assert code == 1, log
    assert "has not produced any output" in log  # submitit's error, raised by the launcher
    assert _results(sweep)[0]["status"] == "ok" and 1 not in _results(sweep)
    assert "| Dense |" in (sweep / "table.md").read_text()
    assert f"python -m lp aggregate {sweep}" in log and "interrupted (the launcher or Hydra failed" in log


@pytest.mark.slow
def test_lp_local_launcher_records_a_killed_job_and_waits_for_the_others(tmp_path):
    """`hydra/launcher=local` (lp.launchers): the first job is killed outright; the second still runs to
    the end, the lost one gets a failed result.json, the sweep is aggregated normally and exits 1."""
    proc = _launch(tmp_path, *SWEEP, "seed=0,1", "hydra/launcher=local")
    sweep = tmp_path / "sweep"
    job = _wait(proc, lambda: _submitit_job(sweep, 1), "job 1 mid-run")
    os.kill(_task(job), signal.SIGKILL)
    code = proc.wait(300)
    log, results = _log(tmp_path), _results(sweep)
    assert code == 1, log
    assert results[1]["status"] == "ok"
    assert "gpu" in results[1]["runtime"] and results[1]["runtime"]["gpu"] is None  # a parallel launcher on CPU
    assert results[0]["status"] == "failed" and results[0]["error"].startswith(f"lost: submitit job {job} ")
    assert "sweep adhoc done: 1 failed, 1 ok" in log and f"python -m lp aggregate {sweep}" in log
    assert "Traceback" not in log


# ----------------------------------------------------------------------------- memory of the gradient pruners
def _windows(n=6, t=20, seed=0):
    import torch

    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def test_auto_layers_per_pass_fits_the_free_memory(monkeypatch):
    from lp.models import tiny_model
    from lp.pruners import taylor

    model = tiny_model("llama", num_layers=6, hidden_size=32)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4  # float32 sums of one layer
    monkeypatch.setattr(taylor, "available_host_bytes", lambda: 2 * 2.5 * per_layer)  # half of it: 2.5 layers
    assert taylor.resolve_layers_per_pass("auto", model, [1, 2, 3, 4]) == 2
    monkeypatch.setattr(taylor, "available_host_bytes", lambda: 2 * 10 * per_layer)
    assert taylor.resolve_layers_per_pass("auto", model, [1, 2, 3, 4]) is None  # all fit: one pass
    monkeypatch.setattr(taylor, "available_host_bytes", lambda: per_layer // 4)
    assert taylor.resolve_layers_per_pass("auto", model, [1, 2, 3, 4]) == 1  # never fewer than one layer
    assert taylor.resolve_layers_per_pass(3, model, [1, 2]) == 3


@pytest.mark.parametrize("layers_per_pass", [1, 2])
def test_taylor_layer_by_layer_equals_one_pass(layers_per_pass, monkeypatch):
    """`layers_per_pass=None` is the former computation (every candidate's float32 gradient sum in one
    pass). Layer groups sum the same micro-batch gradients in the same order, so the scores agree;
    rel 1e-6 (not exact) leaves room for a different kernel when fewer weights need gradients."""
    from lp.models import Decoder, tiny_model
    from lp.pruners import taylor

    model, w = tiny_model("llama", num_layers=9), _windows()
    layers = list(range(4, 7))
    before = taylor.taylor_scores(model, w, layers, micro_batch=2, layers_per_pass=None)
    sizes, real = [], taylor.loss_grads

    def spy(model_, windows_, params, *a, **k):
        sizes.append(sum(p.numel() for p in params))
        return real(model_, windows_, params, *a, **k)

    monkeypatch.setattr(taylor, "loss_grads", spy)
    after = taylor.taylor_scores(model, w, layers, micro_batch=2, layers_per_pass=layers_per_pass)
    assert after == pytest.approx(before, rel=1e-6) and list(after) == layers
    per_layer = sum(p.numel() for p in Decoder(model).layers[4].parameters())
    assert sizes == [per_layer * len(g) for g in ([[6], [5], [4]] if layers_per_pass == 1 else [[6, 5], [4]])]


def test_llm_pruner_layer_by_layer_equals_one_pass():
    import torch

    from lp.models import tiny_model
    from lp.pruners.llm_pruner import unit_importance

    model, w = tiny_model("qwen2", num_layers=5), _windows()  # qwen2: q/k/v biases are scored too
    before = unit_importance(model, w, [1, 2, 3], micro_batch=4, layers_per_pass=None)
    after = unit_importance(model, w, [1, 2, 3], micro_batch=4, layers_per_pass=1)
    for i in (1, 2, 3):  # same tolerance and reason as for Taylor+ above
        torch.testing.assert_close(after[i][0], before[i][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(after[i][1], before[i][1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("pruner", ["taylor", "llm_pruner"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_layers_per_pass_is_checked(pruner, value):
    from lp.pruners.llm_pruner import LLMPruner
    from lp.pruners.taylor import TaylorPruner

    cls = TaylorPruner if pruner == "taylor" else LLMPruner
    with pytest.raises(ValueError, match=rf"pruner={pruner}: pruner.layers_per_pass={value!r} must be auto, an integer >= 1"):
        cls(layers_per_pass=value)


# ----------------------------------------------------------------------------- one GPU per parallel job
def _fake_gpus(monkeypatch, n: int) -> list[int]:
    """Pretend `n` GPUs are visible; returns the list `torch.cuda.set_device` calls are recorded in."""
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def _worker(tmp: str, visible: str, num: int, barrier, out: str) -> None:
    """One parallel job's process: 2 fake GPUs, claims its slot, holds it until the other one has too."""
    import torch

    os.environ.update(TMPDIR=tmp, CUDA_VISIBLE_DEVICES=visible)
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 2)
    torch.cuda.set_device = lambda k: None
    from lp import gpus

    record, warnings = gpus.assign("auto", None, {"n_jobs": 2}, num)
    barrier.wait(30)  # both slots are held at the same time, as by two running jobs
    Path(out).write_text(json.dumps({"record": record, "warnings": warnings}))


def test_two_parallel_jobs_get_distinct_gpus(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), "3,5", i, barrier, str(tmp_path / f"w{i}"))) for i in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = [json.loads((tmp_path / f"w{i}").read_text()) for i in (0, 1)]
    assert sorted(g["record"]["index"] for g in got) == [0, 1] and all(not g["warnings"] for g in got)
    by_slot = {g["record"]["index"]: g["record"] for g in got}
    assert (by_slot[0]["name"], by_slot[1]["name"]) == ("3", "5")  # the physical GPUs behind cuda:0 / cuda:1
    assert by_slot[1]["device"] == "cuda:1" and by_slot[1]["cuda_visible_devices"] == "3,5"


def test_more_jobs_than_gpus_share_with_a_warning(tmp_path, monkeypatch):
    from lp import gpus

    monkeypatch.setattr(gpus, "slot_dir", lambda: tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = _fake_gpus(monkeypatch, 2)
    held = []
    for name in ("0", "1"):  # two other jobs hold both GPUs
        fd = os.open(tmp_path / f"{name}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        monkeypatch.setattr(gpus, "_held", None)
        record, warnings = gpus.assign("auto", None, {"_target_": "hydra_plugins.lp_launcher.LocalLauncher"}, 5)
    finally:
        for fd in held:
            os.close(fd)
    assert record["index"] == 1 and calls == [1] and "more jobs at once than GPUs" in warnings[0]


@pytest.mark.parametrize("device, device_map, launcher, want", [
    ("auto", None, None, None),                                   # basic launcher: one job at a time
    ("auto", None, {"n_jobs": 1}, None),                          # joblib with one worker
    ("auto", None, {"_target_": "hydra_plugins.lp_launcher.SlurmLauncher"}, None),  # SLURM allocates GPUs
    ("cuda:1", None, {"n_jobs": 2}, "model.device=cuda:1: not reassigned"),
    ("auto", "auto", {"n_jobs": 2}, "model.device_map=auto: every visible GPU"),
])
def test_gpu_assignment_only_for_parallel_local_jobs(monkeypatch, tmp_path, device, device_map, launcher, want):
    from lp import gpus

    monkeypatch.setattr(gpus, "slot_dir", lambda: tmp_path)
    calls = _fake_gpus(monkeypatch, 2)
    record, _ = gpus.assign(device, device_map, launcher, 0)
    assert calls == [] and (record if want is None else record["source"]) == want


def test_no_gpu_recorded_on_cpu(monkeypatch):
    import torch

    from lp import gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpus.assign("auto", None, {"n_jobs": 2}, 0) == (None, [])


# ----------------------------------------------------------------------------- lm-eval batch size, distillation autocast
def test_lm_eval_batch_size_auto_is_detected_recorded_and_scores_like_a_fixed_one():
    """On CPU nothing runs out of memory, so lm-eval's search keeps its start (64). Accuracies are
    compared with 1e-9: a few 8-example tasks on a tiny float32 model, where padding a batch changes
    logits by ~1e-7 at most, far from flipping a choice unless two choices tie (then the test would
    fail loudly, not pass wrongly)."""
    from lp.evaluate.lm_eval_tasks import evaluate_tasks
    from lp.models import byte_tokenizer, tiny_model

    model, tok = tiny_model("llama", num_layers=2), byte_tokenizer()
    fixed, info8 = evaluate_tasks(model, tok, ["copa", "piqa"], data_dir=DATA, limit=8, batch_size=8, progress=False)
    auto, info = evaluate_tasks(model, tok, ["copa", "piqa"], data_dir=DATA, limit=8, batch_size="auto", progress=False)
    assert info8["batch_size"] == {"setting": 8, "detected": []}
    assert info["batch_size"]["setting"] == "auto" and info["batch_size"]["detected"] == [64]
    assert auto == pytest.approx(fixed, abs=1e-9)


@pytest.mark.parametrize("value, ok", [("auto", True), ("auto:4", True), (16, True), ("big", False), (0, False)])
def test_lm_eval_batch_size_setting(cfg_factory, value, ok):
    cfg = cfg_factory("eval=qa", f"eval.qa.batch_size={value}")
    if ok:
        validate.settings(cfg, {"eval": "qa"})
    else:
        with pytest.raises(ValueError, match="eval.qa.batch_size"):
            validate.settings(cfg, {"eval": "qa"})


@pytest.mark.parametrize("model_dtype, want", [("float16", "float16"), ("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                               (None, "bfloat16")])
def test_distill_autocast_auto_follows_an_fp16_model(model_dtype, want):
    import torch

    from lp.distill import resolve_autocast

    dtype = None if model_dtype is None else getattr(torch, model_dtype)
    assert resolve_autocast("auto", torch.device("cpu"), dtype) == getattr(torch, want)
    assert resolve_autocast("bfloat16", torch.device("cpu"), torch.float16) == torch.bfloat16  # explicit wins
    assert resolve_autocast("none", torch.device("cpu"), torch.float16) is None


def test_batch_size_auto_is_1_on_the_cpu_and_halves_on_cuda_out_of_memory(monkeypatch):
    """lp.batching: on a GPU the largest size that runs, halving from min(64, windows) on CUDA OOM
    (accelerate's find_executable_batch_size); on the CPU 1 without probing; integers pass through."""
    import torch

    from lp import batching

    tried = []

    def probe(bs):
        tried.append(bs)
        if bs > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert batching.resolve("auto", torch.device("cpu"), probe, 100, "test") == 1 and tried == []
    assert batching.resolve(3, torch.device("cuda"), probe, 100, "test") == 3 and tried == []
    assert batching.resolve("auto", torch.device("cuda"), probe, 100, "test") == 8
    assert tried == [64, 32, 16, 8]
    tried.clear()
    assert batching.resolve("auto", torch.device("cuda"), probe, 5, "test") == 5 and tried == [5]  # capped by windows


def test_batch_size_auto_settings_validate_and_give_the_same_numbers_on_cpu(tmp_path):
    from conftest import make_cfg

    from lp.run import run

    small = [*TINY, *CALIB, "pruner=shortgpt", "pruner.n=2", "patch=rotate", "progress=false"]
    fixed = run(make_cfg(tmp_path / "fixed", [*small, "calib.batch_size=1"]))
    auto = run(make_cfg(tmp_path / "auto", [*small, "calib.batch_size=auto", "eval.ppl.batch_size=auto"]))
    assert auto["data"]["calibration_batch_size"] == 1 and auto["data"]["ppl/wikitext2"]["batch_size"] == 1
    assert auto["pruning"]["removed_layers"] == fixed["pruning"]["removed_layers"]
    assert auto["metrics"]["ppl/wikitext2"] == pytest.approx(fixed["metrics"]["ppl/wikitext2"], rel=1e-6)
    with pytest.raises(ValueError, match="calib.batch_size='big': must be an integer >= 1 or auto"):
        validate.settings(make_cfg(tmp_path / "bad", [*TINY, "calib.batch_size=big"]))
