"""Sweeps through the CLI (tiny model), resume, the aggregation callback and the tracker step of run()."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, REPO, TINY
from omegaconf import OmegaConf
from test_tracking import Recorder

from lp.callbacks import AggregateOnMultirunEnd, config_hash, find_finished, resume_job
from lp.run import run
from lp.tracking import WandbTracker

MANUAL = [*TINY, "pruner=manual", "pruner.layers=[1,2]", "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64"]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python <repo>/run.py args...` from another working directory, data from the mirror."""
    env = {**os.environ, "LP_DATA_DIR": str(DATA), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def results(sweep: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/result.json")}


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_tiny_sweep_fails_one_job_aggregates_and_resumes(tmp_path):
    root = tmp_path / "multirun" / "tiny_smoke"
    first = cli(tmp_path, "sweeps=tiny_smoke", f"hydra.sweep.dir={root / 'first'}", "pruner.layers=[2,3],[9],[5]")
    log = first.stdout + first.stderr
    assert first.returncode == 1, log  # a job failed: non-zero, after the tables were written
    # job 1 is the dense twin of the grid (same model and evaluation), added by the sweeper
    assert "sweep tiny_smoke: 4 jobs" in log and "job 2/4: pruner.layers=[2,3]" in log and "job 4/4:" in log
    assert "job 1/4: sweeps=tiny_smoke pruner=none patch=none distill=none" in log
    r = results(root / "first")
    assert [r[i]["status"] for i in range(4)] == ["ok", "ok", "failed", "ok"]  # job 3 ran after job 2 failed
    assert r[0]["pruning"]["removed_layers"] == [] and r[0]["choices"]["pruner"] == "none"
    assert "out of range" in r[2]["error"] and "[9]" in r[2]["error"]
    assert r[1]["pruning"]["removed_layers"] == [2, 3] and r[3]["pruning"]["removed_layers"] == [5]
    ppl = {i: r[i]["metrics"]["ppl/ptb"] for i in (0, 1, 3)}
    assert all(math.isfinite(v) for v in ppl.values()) and len(set(ppl.values())) == 3

    table = (root / "first" / "table.md").read_text()  # written by the AggregateOnMultirunEnd callback
    failures = table.split("## Failures")[1]
    assert "job 2 (failed)" in failures and "out of range" in failures and "job 1" not in failures
    assert f"| Manual (layers=2,3) | {ppl[1]:.2f} |" in table and f"| Manual (layers=5) | {ppl[3]:.2f} |" in table
    assert table.count(f"| Dense | {ppl[0]:.2f} |") == 2  # first in each block (n = 1, n = 2)
    assert "Settings: Model: tiny_llama (float32); PPL: test split, 4 windows × 128 tokens." in table
    assert "SMOKE SETTINGS: PPL on at most 4 windows" in table and "**" not in table
    assert (root / "first" / "summary.csv").read_text().count("\n") == 5
    assert (root / "first" / "table.tex").is_file()
    html = (root / "first" / "dashboard.html").read_text()
    assert "<svg" in html and "Perplexity vs. removed layers" in html and "Failures (1)" in html

    # Again, in a new timestamp folder of the same sweep: finished jobs are copied, the failed one
    # re-runs; model.device=bogus adds jobs that fail validation, and the sweep goes on.
    second = cli(tmp_path, "sweeps=tiny_smoke", f"hydra.sweep.dir={root / 'second'}",
                 "pruner.layers=[2,3],[9],[5]", "model.device=cpu,bogus")
    log = second.stdout + second.stderr
    assert second.returncode == 1, log
    r2 = results(root / "second")
    assert len(r2) == 8 and "job 8/8:" in log  # 2 dense twins (cpu, bogus) + 6
    resumed = {i: x for i, x in r2.items() if x.get("resumed_from")}
    assert sorted(resumed) == [0, 2, 6]  # dense cpu, ([2,3], cpu) and ([5], cpu)
    assert resumed[0]["resumed_from"] == str((root / "first" / "0" / "result.json").resolve())
    assert resumed[2]["resumed_from"] == str((root / "first" / "1" / "result.json").resolve())
    assert resumed[6]["resumed_from"] == str((root / "first" / "3" / "result.json").resolve())
    assert resumed[2]["metrics"] == r[1]["metrics"] and resumed[6]["metrics"] == r[3]["metrics"]
    assert sorted(resumed[6]["overrides"]) == ["model.device=cpu", "pruner.layers=[5]", "sweeps=tiny_smoke"]
    assert log.count("skipped") == 3 and "force=true re-runs it" in log
    assert r2[4]["status"] == "failed" and "out of range" in r2[4]["error"]  # ([9], cpu): run again
    for i in (1, 3, 7):  # bogus device: a bad setting, caught before loading
        assert r2[i]["status"] == "failed" and "model.device='bogus'" in r2[i]["error"], r2[i]["error"]
        assert "load" not in r2[i]["timing"]
    table = (root / "second" / "table.md").read_text()
    assert table.split("## Failures")[1].count("- job") == 5 and f"{ppl[3]:.2f}" in table
    assert "5 failed, 3 ok (3 resumed)" in log

    # force=true re-runs a finished job
    third = cli(tmp_path, "sweeps=tiny_smoke", f"hydra.sweep.dir={root / 'third'}", "pruner.layers=[5]", "force=true")
    assert third.returncode == 0, third.stdout + third.stderr
    r3 = results(root / "third")
    assert r3[0]["status"] == "ok" and "resumed_from" not in r3[0] and r3[0]["metrics"] == r[0]["metrics"]
    assert r3[1]["status"] == "ok" and "resumed_from" not in r3[1] and r3[1]["metrics"] == r[3]["metrics"]


@pytest.mark.slow
def test_unknown_preset_fails_loudly(tmp_path):
    out = cli(tmp_path, "sweeps=tiny_smok")
    assert out.returncode != 0
    assert "Could not find 'sweeps/tiny_smok'" in out.stderr and "tiny_smoke" in out.stderr
    assert not (tmp_path / "outputs").exists()  # nothing ran


# ------------------------------------------------------------------------------------------ resume
def _result(path: Path, status: str, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"status": status, "name": path.parent.name, "config": config,
                                "choices": {"pruner": "manual"}, "overrides": ["old=1"], "metrics": {"x": 1.0}}))
    return path


def test_config_hash_ignores_only_bookkeeping():
    base = {"seed": 0, "pruner": {"n": 2}, "eval": {"ppl": {"seqlen": 64, "progress": True}},
            "data": {"root": "/a", "source": "auto"}, "paths": {"output_dir": "/x/0"}, "tracker": {"mode": "auto"},
            "sweep_name": "s", "resume": True, "force": False, "runtime": {"threads": "auto"}}
    same = {**base, "eval": {"ppl": {"seqlen": 64, "progress": False}}, "data": {"root": "/b", "source": "auto"},
            "paths": {"output_dir": "/y/3"}, "tracker": {"_target_": "x"}, "sweep_name": "t", "resume": False,
            "runtime": {"threads": 1}}
    assert config_hash(base) == config_hash(same) == config_hash(OmegaConf.create(same))
    # pinned: a change of the bookkeeping set (lp.bookkeeping) or of the hashing shows here, never silently
    assert config_hash(base) == "6c423833ce5fb638"
    for changed in ({"seed": 1}, {"pruner": {"n": 3}}, {"eval": {"ppl": {"seqlen": 65}}},
                    {"data": {"root": "/a", "source": "local"}}):
        assert config_hash({**base, **changed}) != config_hash(base), changed


def test_find_finished_takes_the_newest_ok_match(tmp_path):
    cfg = {"seed": 0, "pruner": {"n": 2}, "paths": {"output_dir": "/now"}, "sweep_name": "s"}
    other = {"seed": 1, "pruner": {"n": 2}, "sweep_name": "s"}
    sweep = tmp_path / "s"
    old = _result(sweep / "t1" / "0" / "result.json", "ok", cfg)
    new = _result(sweep / "t2" / "3" / "result.json", "ok", {**cfg, "paths": {"output_dir": "/t2/3"}})
    os.utime(old, (1, 1))
    for i, status in enumerate(("failed", "running")):  # newer, same config, not finished
        _result(sweep / "t3" / str(i) / "result.json", status, cfg)
    _result(sweep / "t3" / "2" / "result.json", "ok", other)
    (sweep / "t3" / "4").mkdir()
    (sweep / "t3" / "4" / "result.json").write_text('{"status": "ok", "conf')  # torn copy: ignored
    (sweep / "t3" / "5").mkdir()  # a killed job: no result.json
    assert find_finished(cfg, sweep / "t4") == new
    new.unlink()
    assert find_finished(cfg, sweep / "t4") == old
    old.unlink()
    assert find_finished(cfg, sweep / "t4") is None
    assert find_finished(other, sweep / "t4") == sweep / "t3" / "2" / "result.json"


def test_resume_job_copies_with_provenance(tmp_path):
    cfg = OmegaConf.create({"seed": 0, "pruner": {"n": 2}, "sweep_name": "s"})
    prev = _result(tmp_path / "s" / "t1" / "0" / "result.json", "ok", {"seed": 0, "pruner": {"n": 2}, "sweep_name": "s"})
    job = tmp_path / "s" / "t2" / "5"
    assert resume_job(OmegaConf.create({"seed": 1, "pruner": {"n": 2}, "sweep_name": "s"}), job, job.parent) is None
    assert not job.exists()
    got = resume_job(cfg, job, job.parent, {"pruner": "manual", "model": "m"}, ["pruner.n=2"])
    on_disk = json.loads((job / "result.json").read_text())
    assert got == on_disk and on_disk["resumed_from"] == str(prev.resolve())
    assert on_disk["choices"] == {"pruner": "manual", "model": "m"} and on_disk["overrides"] == ["pruner.n=2"]
    assert on_disk["metrics"] == {"x": 1.0} and sorted(p.name for p in job.iterdir()) == ["result.json"]


def test_aggregate_callback_never_raises(tmp_path, caplog):
    cfg = OmegaConf.create({"sweep_name": "s", "hydra": {"sweep": {"dir": str(tmp_path / "nothing")}}})
    with caplog.at_level(logging.ERROR, logger="lp.callbacks"):
        AggregateOnMultirunEnd().on_multirun_end(cfg)
    assert "aggregating" in caplog.text and "does not exist" in caplog.text


# ------------------------------------------------------------------------------------- tracker step
def test_run_starts_and_finishes_the_tracker(cfg_factory, tmp_path, monkeypatch):
    Recorder.instances.clear()
    result = run(cfg_factory(*MANUAL, "tracker=wandb", f"tracker._target_={Recorder.__module__}.Recorder"))
    (t,) = Recorder.instances
    kw = t.kwargs
    assert kw["name"] == "tiny_llama/manual/none/n2" and kw["job_type"] == "manual" and kw["group"] is None
    assert kw["project"] == "lp" and kw["mode"] == "auto" and kw["dir"] == str(tmp_path)
    assert kw["config"] == result["config"] and kw["config"]["pruner"]["layers"] == [1, 2]
    assert t.status == "ok" and t.summaries["status"] == "ok"
    assert t.summaries["ppl/ptb"] == result["metrics"]["ppl/ptb"]
    assert t.summaries["pruning/removed_layers"] == "1 2"

    Recorder.instances.clear()  # a user-set name is kept; a failure is logged and finished as failed
    def bogus(*args, **kwargs):
        raise RuntimeError("bogus failure during evaluation")

    monkeypatch.setattr("lp.run.perplexity", bogus)
    with pytest.raises(RuntimeError, match="bogus"):
        run(cfg_factory(*MANUAL, "tracker=wandb", f"tracker._target_={Recorder.__module__}.Recorder", "tracker.name=mine"))
    (t,) = Recorder.instances
    assert t.kwargs["name"] == "mine" and t.status == "failed"
    assert t.summaries["status"] == "failed" and "bogus" in t.summaries["error"]
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_run_with_wandb_offline_writes_into_the_job_dir(cfg_factory, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))  # no API key anywhere: auto -> offline
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    seen = {}
    finish = WandbTracker.finish

    def spy(self, status="ok"):  # what the live wandb run holds just before it is finished
        run_ = self.run
        seen.update(mode=self.mode, status=status, name=run_.name, group=run_.group, job_type=run_.job_type,
                    ppl=run_.summary["ppl/ptb"], summary_status=run_.summary["status"],
                    layers=run_.config["pruner"]["layers"], dir=run_.dir)
        finish(self, status)

    monkeypatch.setattr(WandbTracker, "finish", spy)
    result = run(cfg_factory(*MANUAL, "tracker=wandb"))
    assert result["status"] == "ok"
    assert seen["mode"] == "offline" and seen["status"] == "ok" and seen["summary_status"] == "ok"
    assert seen["name"] == "tiny_llama/manual/none/n2" and seen["job_type"] == "manual" and not seen["group"]
    assert seen["ppl"] == result["metrics"]["ppl/ptb"] and list(seen["layers"]) == [1, 2]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # in the job dir, ready for `wandb sync`
    assert Path(seen["dir"]).is_relative_to(run_dir) and list(run_dir.glob("run-*.wandb"))


def test_tracker_group_is_the_sweep_name_and_timestamp_in_a_multirun(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lp.tracking import start_tracker

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sweeps=tiny_smoke", "tracker=wandb", f"paths.output_dir={tmp_path}",
                                           f"tracker._target_={Recorder.__module__}.Recorder"], return_hydra_config=True)
    hc, saved = HydraConfig.instance(), HydraConfig.instance().cfg
    try:
        hc.set_config(cfg)  # as inside a job of `python run.py sweeps=tiny_smoke`
        t = start_tracker(cfg, tmp_path, {"name": "x/manual/none/n2", "config": {}}, job_type="manual")
    finally:
        hc.cfg = saved
    stamp = Path(cfg.hydra.sweep.dir).name  # each run of a sweep is its own group: name + timestamp folder
    assert (t.kwargs["group"], t.kwargs["job_type"], t.kwargs["name"]) == (f"tiny_smoke/{stamp}", "manual",
                                                                          "x/manual/none/n2")
    assert len(stamp) >= 15 and stamp[:2] == "20"


def test_run_hands_the_tracker_to_distillation(cfg_factory, monkeypatch):
    import lp.distill

    got = {}
    monkeypatch.setattr(lp.distill, "prepare_teacher", lambda *a, **k: ("teacher", {}))
    monkeypatch.setattr(lp.distill, "distill", lambda model, teacher, d, tracker=None, **k: got.update(
        teacher=teacher, tracker=tracker) or {"steps": 0})
    monkeypatch.setattr(lp.distill, "metrics", lambda info: {"distill/steps": info["steps"]})
    Recorder.instances.clear()
    result = run(cfg_factory(*MANUAL, "patch=rotate", "distill=quick", "calib.corpus=ptb", "calib.split=test",
                             "calib.nsamples=4", "calib.seqlen=64", f"tracker._target_={Recorder.__module__}.Recorder"))
    assert result["status"] == "ok" and result["distill"] == {"steps": 0}
    (t,) = Recorder.instances
    assert got == {"teacher": "teacher", "tracker": t} and t.status == "ok"
