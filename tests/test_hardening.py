"""Hardening (issue 11): remote code only when allowed, the one cache mechanism under corruption,
concurrency and a read-only folder, every bad setting caught before the model loads, SIGTERM,
the exit code of a sweep with a failed job and the scope of resume."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CALIB, ENV, REPO, TINY, cli
from omegaconf import OmegaConf

from lp import cache, calib, models
from lp.calib import Calibration
from lp.callbacks import find_finished
from lp.pruners.base import PruneContext
from lp.run import preflight, run


# ----------------------------------------------------------------------------- security
def evil_model(folder: Path, marker: Path) -> Path:
    """A model folder whose custom configuration code writes `marker` when it is imported."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lp_evil", "auto_map": {"AutoConfig": "configuration_lp_evil.EvilConfig"},
        "num_hidden_layers": 4, "hidden_size": 64}))
    (folder / "configuration_lp_evil.py").write_text(
        "from pathlib import Path\nfrom transformers import PretrainedConfig\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'lp_evil'\n")
    return folder


@pytest.mark.parametrize("value", ['"false"', "no", "'0'", "null", "false"])
def test_remote_code_never_runs_unless_trust_remote_code_is_true(cfg_factory, tmp_path, value):
    marker = tmp_path / "pwned"
    folder = evil_model(tmp_path / "evil", marker)
    cfg = cfg_factory(*TINY, "model=llama2_7b", f"model.pretrained={folder}", f"model.trust_remote_code={value}")
    with pytest.raises(ValueError, match="trust_remote_code"):
        run(cfg)
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_remote_code"):  # the loader itself: booleans only
        models.load_config(cfg.model)
    assert not marker.exists()


def test_remote_code_runs_with_trust_remote_code_true(cfg_factory, tmp_path):
    """The counterpart: the folder above really does run its code when allowed (so the test can fail)."""
    marker = tmp_path / "pwned"
    folder = evil_model(tmp_path / "evil", marker)
    cfg = cfg_factory(*TINY, "model=llama2_7b", f"model.pretrained={folder}", "model.trust_remote_code=true")
    models.load_config(cfg.model)
    assert marker.read_text() == "remote code ran"


# ----------------------------------------------------------------------------- the cache
def test_cache_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    old = os.umask(0o002)  # group-shared cache
    try:
        from safetensors.torch import save_file

        got = cache.fetch("x", {"a": 1}, lambda d: save_file({"t": torch.zeros(2)}, str(d / "t.safetensors")),
                          load=lambda p: p)
    finally:
        os.umask(old)
    assert (got.path / "t.safetensors").stat().st_mode & 0o777 == 0o664  # safetensors alone writes 0600
    assert got.path.stat().st_mode & 0o777 == 0o775


def fake_gguf(tmp_path, monkeypatch) -> list:
    """`convert_gguf` with the packaged GGUF replaced by a tiny random model; returns the build log."""
    import transformers

    src = tmp_path / "pkg" / "Tiny.Q4.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF" + bytes(60))
    builds = []
    monkeypatch.setattr(models, "gguf_path", lambda package, file: src)
    monkeypatch.setattr(transformers, "GgufConfig", lambda **kw: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: builds.append(1) or models.tiny_model(num_layers=2))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: models.byte_tokenizer())
    return builds


@pytest.mark.parametrize("damage", ["delete", "truncate", "manifest"])
def test_damaged_converted_model_is_rebuilt(tmp_path, monkeypatch, caplog, damage):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    builds = fake_gguf(tmp_path, monkeypatch)
    path = models.convert_gguf("pkg", "Tiny.Q4.gguf")
    weights = path / "model.safetensors"
    assert path == tmp_path / "cache" / "models" / "Tiny.Q4" and weights.is_file() and builds == [1]
    if damage == "delete":
        weights.unlink()
    elif damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    else:
        (path / "manifest.json").unlink()  # e.g. a folder left by an older lp or copied by hand
    with caplog.at_level(logging.WARNING, logger="lp.cache"):
        again = models.convert_gguf("pkg", "Tiny.Q4.gguf")
    assert again == path and builds == [1, 1] and "removing and rebuilding" in caplog.text
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(path)).num_hidden_layers == 2
    models.convert_gguf("pkg", "Tiny.Q4.gguf")
    assert builds == [1, 1]  # healed: the next run uses the entry


def calib_ctx(model, windows, key):
    return PruneContext(model, None, Calibration(lambda: (windows, {"windows": len(windows)})), cache_key=key,
                        batch_size=2)


def test_truncated_calibration_statistics_are_rebuilt_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    model = models.tiny_model(num_layers=4)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    key = {"model": "tiny", "calib": {"seed": 0}}
    first = calib.get_stats(calib_ctx(model, windows, key))
    f = Path(first.cost["path"]) / "stats.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with caplog.at_level(logging.WARNING, logger="lp.cache"):
        second = calib.get_stats(calib_ctx(model, windows, key))
    assert second.cost["cached"] is False and "truncated" in caplog.text
    third = calib.get_stats(calib_ctx(model, windows, key))
    assert third.cost["cached"] is True  # the rebuilt entry replaced the bad one
    assert torch.equal(third.cos_token, first.cos_token)


@pytest.mark.parametrize("file", ["topk_val.npy", "ids.npy"])
def test_truncated_teacher_logits_are_rebuilt(tmp_path, caplog, file):
    from lp.distill import build_teacher

    model = models.tiny_model(num_layers=2)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    first = build_teacher(model, windows, 3, 5, {"t": 1}, root=tmp_path, progress=False)
    reference = [x.clone() for x in first.get(range(4))]
    f = first.path / file
    del first
    os.truncate(f, f.stat().st_size - 40)
    with caplog.at_level(logging.WARNING, logger="lp.cache"):
        again = build_teacher(model, windows, 3, 5, {"t": 1}, root=tmp_path, progress=False)
    assert "truncated" in caplog.text and f.stat().st_size > 0
    assert all(torch.equal(a, b) for a, b in zip(again.get(range(4)), reference, strict=True))


def test_leftover_temporary_folders_of_killed_writers_are_removed(tmp_path, monkeypatch):
    """Dead writers: on this host a process that no longer exists; elsewhere (or an older name without the
    host) a folder untouched for a day. A live writer's folder stays even if the lock is not trusted."""
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    host, entry = socket.gethostname(), cache.digest({"a": 1})
    stale = [tmp_path / "x" / f".other.tmp-{host}-{dead.pid}-dead", tmp_path / "x" / f".{entry}.tmp-{host}-{dead.pid}-ab",
             tmp_path / "x" / f".{entry}.tmp-1-old", tmp_path / "x" / f".{entry}.tmp-node7-12-old"]
    live = [tmp_path / "x" / f".{entry}.tmp-{host}-{os.getpid()}-live", tmp_path / "x" / f".{entry}.tmp-node7-12-new"]
    for d in stale + live:
        d.mkdir(parents=True)
        (d / "half.bin").write_bytes(b"0" * 10)
    for d in stale[2:]:
        os.utime(d, (time.time() - 2 * cache.STALE_S,) * 2)
    got = cache.fetch("x", {"a": 1}, lambda d: (d / "v").write_text("1"), load=lambda p: (p / "v").read_text())
    assert got.value == "1" and not got.hit
    assert not any(d.exists() for d in stale)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == sorted([got.path.name, *(d.name for d in live)])


def _slow_fetch(root: str, out: str) -> None:
    os.environ["LP_CACHE_DIR"] = root

    def build(d: Path) -> None:
        with open(Path(root) / "builds.log", "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.5)  # both processes are inside fetch while the entry is missing
        (d / "v.json").write_text(json.dumps({"pid": os.getpid()}))

    got = cache.fetch("slow", {"k": 1}, build, load=lambda p: json.loads((p / "v.json").read_text()))
    Path(out).write_text(json.dumps(got.value))


def test_concurrent_processes_build_a_missing_entry_once(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_fetch, args=(str(tmp_path), str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    values = [json.loads((tmp_path / f"out{i}").read_text()) for i in range(2)]
    assert values[0] == values[1]
    assert len((tmp_path / "builds.log").read_text().split()) == 1


@pytest.mark.slow
def test_two_fresh_cache_runs_at_once_on_the_tiny_model(tmp_path):
    args = [*TINY, *CALIB, "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "pruner=shortgpt", "pruner.n=2",
            "patch=rotate"]
    env = {**ENV, "LP_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={tmp_path / str(i)}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    results = [json.loads((tmp_path / str(i) / "result.json").read_text()) for i in range(2)]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["pruning"]["removed_layers"] == results[1]["pruning"]["removed_layers"]
    assert sum("calibration statistics computed" in log for log in logs) == 1, logs  # computed once


def read_only(path: Path, monkeypatch) -> None:
    """Make `path` read-only (root ignores permission bits: then creating anything under it fails)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_mkdir, real_open = os.mkdir, os.open

    def inside(p) -> bool:
        return str(Path(p).absolute()).startswith(str(path) + os.sep)

    def mkdir(p, *a, **k):
        if inside(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_mkdir(p, *a, **k)

    def open_(p, flags, *a, **k):
        if inside(p) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and not os.path.exists(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_read_only_cache_warns_and_the_run_goes_on(cfg_factory, tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    args = [*TINY, *CALIB, "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "pruner=sleb", "pruner.n=2",
            "patch=rotate", f"paths.cache_dir={root}"]
    read_only(root, monkeypatch)
    try:
        with caplog.at_level(logging.WARNING, logger="lp.cache"):
            result = run(cfg_factory(*args))
    finally:
        root.chmod(0o755)
    assert result["status"] == "ok" and result["pruning"]["removed_layers"]
    assert "is not writable" in caplog.text and "continuing without caching" in caplog.text
    assert list(root.iterdir()) == []


# ----------------------------------------------------------------------------- validation before loading
@pytest.mark.parametrize("override, message", [
    ("calib.nsamples=0", "calib.nsamples=0: must be an integer >= 1"),
    ("calib.nsamples=-3", "calib.nsamples=-3: must be an integer >= 1"),
    ("calib.nsamples=abc", "calib.nsamples='abc': must be an integer"),
    ("calib.batch_size=0", "calib.batch_size=0: must be an integer >= 1"),
    ("eval.ppl.batch_size=0", "eval.ppl.batch_size=0: must be an integer >= 1"),
    ("calib.holdout=1.5", r"calib.holdout=1.5: must be a fraction in \[0, 1\)"),
    ("eval.ppl.max_windows=-1", "eval.ppl.max_windows=-1: must be null .* or an integer >= 1"),
    ("pruner.layers=abc", "pruner.layers='abc': must be a list of ints"),
    ("pruner.layers=3", "pruner.layers=3: must be a list of ints"),
    ("pruner.layers=[1,x]", r"pruner.layers=\[1, 'x'\]: must be a list of ints"),
    ("eval.ppl.progress=no", "eval.ppl.progress='no': must be true or false"),
    ("+foo=1", "unknown setting foo=1: no key 'foo' in conf/config.yaml"),
    ("+pruner.nn=3", r"unknown setting pruner.nn=3: .*\(did you mean pruner.layers\?|unknown setting pruner.nn=3"),
    ("+eval.ppl.max_window=3", r"unknown setting eval.ppl.max_window=3: .*did you mean eval.ppl.max_windows\?"),
    ("data.root=/nonexistent/lp-data", "data.root='/nonexistent/lp-data' .* is not a folder"),
])
def test_bad_setting_fails_before_the_model_loads(cfg_factory, override, message):
    """The checks `run` makes before loading (`lp.run.preflight`); that a run records such a failure
    without loading: test_run.py::test_a_run_that_fails_its_checks_records_it_without_loading."""
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        preflight(cfg_factory(*TINY, "pruner=manual", "pruner.layers=[1]", override))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(cfg_factory):
    with pytest.raises(ValueError, match="model.device='cuda' but no CUDA GPU is visible here; use model.device=cpu"):
        run(cfg_factory(*TINY, "model.device=cuda"))


def test_hub_model_without_hub_access_names_the_model_and_the_way_out(cfg_factory, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent/hf-home")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"model llama3_8b: model.pretrained='meta-llama/Meta-Llama-3-8B' "
                                                r"is not a local folder .* hub is unreachable.*set model.pretrained="):
        run(cfg_factory(*TINY, "model=llama3_8b"))
    assert time.perf_counter() - t0 < 20  # no minute of retries


@pytest.mark.slow
def test_cli_bad_settings_are_one_line_exit_2(tmp_path):
    for args, line in [(["+foo=1"], "error: unknown setting foo=1"),
                       (['model.trust_remote_code="false"'], "error: model.trust_remote_code='false': must be true or false"),
                       (["model.device=cuda"], "error: model.device='cuda' but no CUDA GPU is visible")]:
        proc = cli(*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}", env={"CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
        assert proc.stderr.strip().startswith(line), proc.stderr


# ----------------------------------------------------------------------------- signals, sweeps, resume
@pytest.mark.slow
def test_sigterm_leaves_a_failed_result_json(tmp_path):
    args = [*TINY, "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=null",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:  # wait until the run is inside the pipeline
        seen.append(line)
        if "[load]" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and "SIGTERM" in result["error"]
    assert "error: terminated by SIGTERM" in rest


def _ok(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": "ok", "config": config, "metrics": {}}))
    return path


def test_resume_reuses_only_the_same_sweep(tmp_path):
    cfg = {"seed": 0, "pruner": {"n": 2}, "sweep_name": "adhoc"}
    _ok(tmp_path / "scratch" / "other" / "0" / "result.json", cfg)  # an unrelated sweep beside the new one
    assert find_finished(cfg, tmp_path / "scratch" / "new") is None
    same = _ok(tmp_path / "scratch" / "new" / "0" / "result.json", cfg)  # the same folder, run again
    assert find_finished(cfg, tmp_path / "scratch" / "new") == same
    family = tmp_path / "multirun" / "adhoc"  # default layout: multirun/<sweep_name>/<timestamp>/<job>
    earlier = _ok(family / "t1" / "3" / "result.json", cfg)
    assert find_finished(cfg, family / "t2") == earlier
    _ok(family / "t1" / "3" / "result.json", {**cfg, "sweep_name": "other"})  # same config, another sweep
    assert find_finished(OmegaConf.create(cfg), family / "t2") is None
