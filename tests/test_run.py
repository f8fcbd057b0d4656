"""End to end through `run(cfg)` and the CLI: tiny model, then the real embedded SmolLM2."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import DATA, REPO, TINY

from lp.run import preflight, run


def test_dense_and_manual_on_tiny_model(cfg_factory, tmp_path):
    dense = run(cfg_factory(*TINY))
    assert dense["status"] == "ok" and dense["pruning"]["removed_layers"] == []
    pruned = run(cfg_factory(*TINY, "pruner=manual", "pruner.layers=[5,2]"))
    p = pruned["pruning"]
    assert p["removed_layers"] == [2, 5] and p["num_layers_after"] == 6
    assert p["params_pruned"] < p["params_dense"] and 0 < p["pruned_ratio"] < 1
    on_disk = json.loads((tmp_path / "result.json").read_text())
    assert on_disk["metrics"] == pruned["metrics"] and on_disk["status"] == "ok"
    assert set(on_disk["timing"]) >= {"load", "select", "drop", "eval_ppl", "total"}
    assert on_disk["data"]["ppl/wikitext2"]["source"] == "local"
    assert on_disk["versions"]["torch"] and "git_commit" in on_disk
    assert math.isfinite(pruned["metrics"]["ppl/wikitext2"])
    assert pruned["metrics"]["ppl/wikitext2"] != dense["metrics"]["ppl/wikitext2"]


def test_same_config_gives_same_numbers(cfg_factory):
    a = run(cfg_factory(*TINY, "pruner=manual", "pruner.layers=[1]"))
    b = run(cfg_factory(*TINY, "pruner=manual", "pruner.layers=[1]"))
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize("override, msg", [
    ("pruner.layers=[8]", r"layer indices \[8\] out of range: the model has layers 0\.\.7"),
    ("pruner.layers=[1,1]", "duplicate layer indices"),
    ("pruner.layers=[0,1,2,3,4,5,6,7]", "cannot remove all 8 layers"),
    ("eval.ppl.seqlen=5000", "eval.ppl.seqlen=5000 exceeds the model's context"),
    ("eval.ppl.datasets=[c5]", "unknown corpus 'c5'"),
    ("eval.ppl.datasets=[wikitext2,ptb:dev]", "corpus 'ptb' has no split 'dev'"),
    ("eval.ppl.loss_dtype=half", "eval.ppl.loss_dtype='half'; choose one of"),
])
def test_bad_input_fails_before_loading(cfg_factory, override, msg):
    layers = [] if override.startswith("pruner.layers") else ["pruner.layers=[1]"]
    with pytest.raises(ValueError, match=msg):
        preflight(cfg_factory(*TINY, "pruner=manual", *layers, override))


@pytest.mark.parametrize("override, msg", [
    ("calib.nsamples=0", "calib.nsamples=0: must be an integer >= 1"),  # lp.validate.settings
    ("pruner.layers=[8]", r"layer indices \[8\] out of range"),  # the model's config (check_model)
])
def test_a_run_that_fails_its_checks_records_it_without_loading(cfg_factory, tmp_path, monkeypatch, override, msg):
    """The run-level exit path of every `preflight` error (the CLI's: test_hardening.py, exit 2)."""
    monkeypatch.setattr("lp.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=msg):
        run(cfg_factory(*TINY, "pruner=manual", "pruner.layers=[1]", override))
    failed = json.loads((tmp_path / "result.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("ValueError: ") and "load" not in failed["timing"]


def test_per_dataset_splits_and_official_loss_in_one_run(cfg_factory):
    """eval=official: WikiText-2 test and PTB validation in one run, loss in the logits' dtype."""
    cfg = cfg_factory("model=tiny_llama", "eval=official", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2",
                      "eval.ppl.progress=false")
    assert list(cfg.eval.ppl.datasets) == ["wikitext2", "ptb:validation"] and cfg.eval.ppl.loss_dtype == "logits"
    assert (cfg.eval.ppl.split, cfg.eval.ppl.batch_size, cfg.eval.get("qa")) == ("test", 1, None)
    r = run(cfg)
    d = r["data"]
    assert (d["ppl/wikitext2"]["split"], d["ppl/ptb"]["split"]) == ("test", "validation")
    assert d["ppl/ptb"]["loss_dtype"] == "logits"
    accurate = run(cfg_factory("model=tiny_llama", "eval=official", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2",
                               "eval.ppl.progress=false", "eval.ppl.loss_dtype=float32"))
    for name in ("ppl/wikitext2", "ppl/ptb"):  # tiny_llama runs in float32: both arithmetics agree closely
        assert math.isclose(r["metrics"][name], accurate["metrics"][name], rel_tol=1e-5)


def test_missing_local_split_is_a_clear_error(cfg_factory, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected .*ptb/train.txt|no local file"):
        run(cfg_factory(*TINY, "data.source=local", "eval.ppl.datasets=[ptb]", "eval.ppl.split=train",
                        f"data.root={tmp_path / 'empty'}"))


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", *TINY, "pruner=manual", "pruner.layers=[99]", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "LP_DATA_DIR": str(DATA)}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: layer indices [99] out of range: the model has layers 0..7"
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"
    unknown = subprocess.run([sys.executable, "run.py", "pruner=nope"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert unknown.returncode != 0 and "Available options" in unknown.stderr and "manual" in unknown.stderr


@pytest.mark.slow
def test_qa_with_dense_reference_computes_rp(cfg_factory, tmp_path):
    qa = ["model=tiny_llama", "eval=qa_quick", "eval.qa.tasks=[copa,piqa]", "eval.qa.limit=6", "eval.qa.progress=false"]
    dense = run(cfg_factory(*qa))
    ref = tmp_path / "dense.json"
    ref.write_text(json.dumps(dense))
    pruned = run(cfg_factory(*qa, "pruner=manual", "pruner.layers=[3]", f"eval.qa.dense_reference={ref}"))
    m = pruned["metrics"]
    scores = {t: m[f"qa/{t}/score"] for t in ("copa", "piqa")}
    dense_scores = {t: dense["metrics"][f"qa/{t}/score"] for t in ("copa", "piqa")}
    assert m["qa/avg"] == pytest.approx(sum(scores.values()) / 2)
    assert all(dense_scores.values()), dense_scores  # else RP is undefined and the check below would not apply
    assert m["qa/rp"] == pytest.approx(100 * sum(scores[t] / dense_scores[t] for t in scores) / 2)
    with pytest.raises(ValueError, match="eval.qa.limit=6.*this run uses 7"):
        run(cfg_factory(*qa, "eval.qa.limit=7", "pruner=manual", "pruner.layers=[3]", f"eval.qa.dense_reference={ref}"))


@pytest.mark.real
def test_real_smollm2_dense_then_manual(cfg_factory):
    small = ["model=smollm2_135m", "eval.ppl.seqlen=512", "eval.ppl.max_windows=2", "eval.ppl.progress=false",
             "calib.nval=0"]  # no held-out check of the manual selection (8 x 2048 tokens): PPL is what is tested
    dense = run(cfg_factory(*small))["metrics"]["ppl/wikitext2"]
    pruned = run(cfg_factory(*small, "pruner=manual", "pruner.layers=[20,21,22,23,24]"))
    ppl = pruned["metrics"]["ppl/wikitext2"]
    assert 5 < dense < 60, dense  # SmolLM2-135M on WikiText-2: ~20-30 at 512 tokens
    assert ppl > dense * 1.05 and math.isfinite(ppl)
    assert pruned["model"]["num_layers"] == 30 and pruned["pruning"]["num_layers_after"] == 25
