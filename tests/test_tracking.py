"""lp.tracking without any network: NoneTracker, mode resolution, wandb disabled/offline runs."""

from __future__ import annotations

import json
import logging
import socket
from types import SimpleNamespace

import pytest

from lp import tracking
from lp.tracking import NoneTracker, Tracker, WandbTracker, log_result

RESULT = {
    "status": "ok", "error": None,
    "pruning": {"method": "linearpatch", "n": 2, "removed_layers": [20, 21], "num_layers_after": 28,
                "pruned_ratio": 0.05, "scores": {"kind": "cosine_by_start", "values": [0.9, 0.95, 0.8]}},
    "patch": {"kind": "rotate", "cuts": [{"before_layer": 20, "removed": [20, 21], "scale_min": 0.8,
                                          "scale_median": 1.1, "scale_max": 3.0}]},
    "metrics": {"ppl/wikitext2": 25.3, "qa/piqa/score": 0.61, "qa/avg": 0.6, "qa/rp": 95.1},
    "timing": {"prune": 0.1, "total": 140.0},
}
SUMMARY = {"ppl/wikitext2": 25.3, "qa/piqa/score": 0.61, "qa/avg": 0.6, "qa/rp": 95.1,
           "pruning/n": 2, "pruning/num_layers_after": 28, "pruning/pruned_ratio": 0.05,
           "pruning/removed_layers": "20 21", "timing/prune": 0.1, "timing/total": 140.0, "status": "ok"}


class Recorder:
    """A tracker that remembers every instance and call (also a `_target_` for tracker configs)."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.summaries, self.tables, self.logs, self.status = kwargs, {}, {}, [], None
        Recorder.instances.append(self)

    def log(self, metrics, step=None):
        self.logs.append((metrics, step))

    def log_table(self, name, columns, rows):
        self.tables[name] = (columns, rows)

    def summary(self, values):
        self.summaries.update(values)

    def finish(self, status="ok"):
        self.status = status


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No API key anywhere, all wandb files in tmp, and a base URL that cannot leave the machine."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def test_none_tracker_and_protocol():
    t = NoneTracker(project="ignored", dir="/nonexistent", config={"a": 1})
    assert isinstance(t, Tracker) and isinstance(Recorder(), Tracker)
    log_result(t, RESULT)
    t.log({"x": 1.0}, step=3)
    t.finish("failed")


def test_log_result_content():
    rec = Recorder()
    metrics = {**RESULT["metrics"], "bad": None}  # non-numbers are not logged
    log_result(rec, {**RESULT, "status": "failed", "error": "boom", "metrics": metrics})
    assert rec.summaries == {**SUMMARY, "status": "failed", "error": "boom"}
    assert rec.tables["pruning/scores"] == (["index", "score"], [[0, 0.9], [1, 0.95], [2, 0.8]])
    cols, rows = rec.tables["patch/cuts"]
    assert cols == ["cut", "before_layer", "removed", "scale_min", "scale_median", "scale_max"]
    assert rows == [[0, 20, "20 21", 0.8, 1.1, 3.0]]
    rec2 = Recorder()
    log_result(rec2, {"status": "ok", "metrics": {"ppl/c4": 9.0}})  # dense: no scores, no cuts
    assert rec2.summaries == {"ppl/c4": 9.0, "status": "ok"} and rec2.tables == {}


def test_resolve_mode(no_wandb_account, monkeypatch):
    assert tracking.resolve_mode("disabled") == ("disabled", "requested")
    with pytest.raises(ValueError, match="auto"):
        tracking.resolve_mode("sometimes")
    mode, reason = tracking.resolve_mode("auto")
    assert mode == "offline" and "no API key" in reason
    (no_wandb_account / "home").mkdir()
    (no_wandb_account / "home" / ".netrc").write_text("machine 127.0.0.1 login user password secret\n")
    assert tracking.api_key_configured()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    mode, reason = tracking.resolve_mode("auto", base_url=f"http://127.0.0.1:{port}", timeout=0.5)
    assert mode == "offline" and "not reachable" in reason
    with socket.create_server(("127.0.0.1", 0)) as server:  # a local "server" that answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        mode, reason = tracking.resolve_mode("auto", base_url=url, timeout=2)
        assert (mode, reason) == ("online", "API key set and server reachable")


def test_wandb_disabled_summary(no_wandb_account):
    t = WandbTracker(project="lp-test", mode="disabled", dir=no_wandb_account / "job", config={"a": 1})
    log_result(t, RESULT)
    assert {k: t.run.summary[k] for k in SUMMARY} == SUMMARY
    t.finish()


def test_wandb_auto_goes_offline_and_writes_to_job_dir(no_wandb_account, caplog):
    job = no_wandb_account / "multirun" / "0"
    with caplog.at_level(logging.WARNING, logger="lp.tracking"):
        t = WandbTracker(project="lp-test", group="sweep", job_type="prune", name="n2", dir=job,
                         config={"pruner": {"n": 2}}, tags=["test"])
    assert t.mode == "offline"
    msg = caplog.text
    assert "OFFLINE" in msg and "no API key" in msg and "wandb sync" in msg and str(job) in msg
    run_dir = next((job / "wandb").glob("offline-run-*"))
    assert str(run_dir) in msg
    log_result(t, RESULT)
    t.log({"train/loss": 0.5}, step=10)
    assert {k: t.run.summary[k] for k in SUMMARY} == SUMMARY
    assert t.run.config["pruner"] == {"n": 2}
    t.finish("ok")
    t.finish("ok")  # idempotent
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in run_dir.rglob("*.table.json")}
    assert tables["scores"]["columns"] == ["index", "score"]
    assert tables["scores"]["data"] == [[0, 0.9], [1, 0.95], [2, 0.8]]
    assert tables["cuts"]["data"] == [[0, 20, "20 21", 0.8, 1.1, 3.0]]
    assert list(run_dir.glob("run-*.wandb"))  # the offline log that `wandb sync` uploads


def test_online_init_failure_falls_back_offline(no_wandb_account, monkeypatch, caplog):
    import wandb

    calls = []

    def fake_init(mode, **kwargs):
        calls.append(mode)
        if mode == "online":
            raise ConnectionError("server said no")
        return SimpleNamespace(settings=SimpleNamespace(sync_dir="/x/offline-run-1"), finish=lambda **_: None)

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(tracking, "resolve_mode", lambda mode, **_: ("online", "forced"))
    with caplog.at_level(logging.WARNING, logger="lp.tracking"):
        t = WandbTracker(project="lp-test", mode="auto", dir=no_wandb_account / "job")
    assert calls == ["online", "offline"] and t.mode == "offline"
    assert "server said no" in caplog.text and "wandb sync /x/offline-run-1" in caplog.text
