"""lp.tracking without any network: NoneTracker, mode resolution, wandb disabled/offline runs."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from lp import tracking
from lp.patch import CUT_FIELDS
from lp.tracking import NoneTracker, Tracker, WandbTracker, log_result

RESULT = {
    "status": "ok", "error": None,
    "pruning": {"method": "linearpatch", "n": 2, "removed_layers": [20, 21], "num_layers_after": 28,
                "pruned_ratio": 0.05, "scores": {"kind": "cosine_by_start", "values": [0.9, 0.95, 0.8]}},
    "patch": None,  # filled below from real build_patches output
    "metrics": {"ppl/wikitext2": 25.3, "qa/piqa/score": 0.61, "qa/avg": 0.6, "qa/rp": 95.1},
    "timing": {"prune": 0.1, "total": 140.0},
}


def _real_patch_record() -> dict:
    """`result["patch"]` as build_patches writes it: tiny Llama, removed layers 1, 2 and 4."""
    import torch
    from omegaconf import OmegaConf

    from lp.calib import Calibration
    from lp.models import tiny_model
    from lp.patch import build_patches
    from lp.pruners import PruneContext

    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=1)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ctx = PruneContext(model, None, Calibration(lambda: (windows, {"windows": 2})), cache_key={})
    cfg = OmegaConf.create({"kind": "rotate", "hadamard": "constructed", "hadamard_seed": None,
                            "hadamard_fallback_seed": None})
    return build_patches(ctx, [1, 2, 4], cfg)[1]


RESULT["patch"] = _real_patch_record()
ROTATE_FIELDS = ("cut", "start", "end", "before", "kind", "scale_min", "scale_median", "scale_max")


def _rotate_fields_filled(cols: list[str], row: list) -> bool:
    return all(row[cols.index(k)] is not None for k in ROTATE_FIELDS) and row[cols.index("kind")] == "rotate"
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

    def log_html(self, name, html):
        self.htmls = {**getattr(self, "htmls", {}), name: html}

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
    cuts = RESULT["patch"]["cuts"]
    assert cols == ["cut", *CUT_FIELDS] and [tuple(c) for c in cuts] == [CUT_FIELDS] * 2  # one record type
    assert rows == [[i, *c.values()] for i, c in enumerate(cuts)]
    assert [r[1:5] for r in rows] == [[1, 3, 3, "rotate"], [4, 5, 5, "rotate"]]
    assert all(r[cols.index("scale_median")] > 0 for r in rows)
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
    cols, data = tables["cuts"]["columns"], tables["cuts"]["data"]
    assert cols[:4] == ["cut", "start", "end", "before"] and [r[:4] for r in data] == [[0, 1, 3, 3], [1, 4, 5, 5]]
    assert cols == ["cut", *CUT_FIELDS] and all(_rotate_fields_filled(cols, r) for r in data)
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


# ------------------------------------------------------------------ real records, sweeps, resume
def test_offline_run_files_hold_a_non_empty_cuts_table(cfg_factory, no_wandb_account):
    """The cuts table is built from what `build_patches` really records (through run())."""
    from lp.run import run

    result = run(cfg_factory("model=tiny_llama", "pruner=manual", "pruner.layers=[2,3,5]", "patch=rotate",
                             "calib=quick", "calib.nsamples=4", "calib.seqlen=64", "eval=quick",
                             "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2",
                             "eval.ppl.progress=false", "tracker=wandb", "tracker.mode=offline"))
    cuts = result["patch"]["cuts"]
    assert [(c["start"], c["end"]) for c in cuts] == [(2, 4), (5, 6)]
    out = Path(result["config"]["paths"]["output_dir"])
    (table,) = [json.loads(p.read_text()) for p in (out / "wandb").rglob("*.table.json") if "cuts" in p.name]
    cols = table["columns"]
    assert cols[:3] == ["cut", "start", "end"] and len(cols) > 4
    assert [row[1:3] for row in table["data"]] == [[2, 4], [5, 6]]
    for row in table["data"]:  # every field a rotate patch records is filled in
        assert _rotate_fields_filled(cols, row), dict(zip(cols, row, strict=True))
        assert row[cols.index("cut")] in (0, 1)
    assert cols == tracking.cut_table(cuts)[0]


def test_resumed_result_and_aggregated_sweep_are_logged(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lp import aggregate
    from lp.tracking import log_finished

    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["sweeps=tiny_smoke", "tracker=wandb", f"paths.output_dir={tmp_path / '1'}",
                                           f"tracker._target_={Recorder.__module__}.Recorder"], return_hydra_config=True)
    group = f"tiny_smoke/{Path(cfg.hydra.sweep.dir).name}"
    prev = {**RESULT, "name": "tiny/manual/none/n2", "config": {"seed": 0}, "resumed_from": "/old/1/result.json"}
    Recorder.instances.clear()
    hc, saved = HydraConfig.instance(), HydraConfig.instance().cfg
    try:
        hc.set_config(cfg)
        log_finished(cfg, tmp_path / "1", prev)  # a job skipped by resume is still one run of the group
    finally:
        hc.cfg = saved
    (t,) = Recorder.instances
    assert (t.kwargs["group"], t.kwargs["name"], t.kwargs["job_type"]) == (group, prev["name"], "linearpatch")
    assert t.summaries["resumed_from"] == "/old/1/result.json" and t.status == "ok"
    assert t.summaries["ppl/wikitext2"] == 25.3 and t.tables["patch/cuts"][1]

    sweep = Path(cfg.hydra.sweep.dir.replace("outputs", str(tmp_path)))
    for i, r in enumerate([{**RESULT, "choices": {"model": "m", "pruner": "none", "patch": "none"},
                            "pruning": {"n": 0}, "metrics": {"ppl/wikitext2": 20.0}}, RESULT]):
        (sweep / str(i)).mkdir(parents=True)
        (sweep / str(i) / "result.json").write_text(json.dumps(
            {"choices": {"model": "m", "pruner": "linearpatch", "patch": "rotate"}, **r}))
    Recorder.instances.clear()
    aggregate.log_sweep(cfg, sweep)
    (t,) = Recorder.instances
    assert (t.kwargs["group"], t.kwargs["job_type"]) == (f"tiny_smoke/{sweep.name}", "aggregate")
    cols, rows = t.tables["sweep/summary"]
    assert len(rows) == 2 and "ppl/wikitext2" in cols
    cols, rows = t.tables["sweep/perplexity"]
    assert [r[cols.index("method")] for r in rows] == ["Dense", "LinearPatch block +LinearPatch"]
    assert any(k.startswith("dashboard/perplexity") and "<svg" in v for k, v in t.htmls.items())
    assert "<html" in t.htmls["dashboard/page"] and t.status == "ok"
