"""SLEB, PPL and Taylor+ pruners against naive re-implementations on tiny random models."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA
from hydra import compose, initialize_config_dir

from lp.calib import Calibration
from lp.evaluate.ppl import window_nll
from lp.models import drop_layers, tiny_model
from lp.pruners import PruneContext
from lp.pruners._suffix import score_removals
from lp.pruners.ppl import PPLPruner
from lp.pruners.sleb import SLEBPruner
from lp.pruners.taylor import TaylorPruner
from lp.replay import Replay, StreamCache

REPO = Path(__file__).resolve().parents[1]
ARCHS = ["llama", "qwen2", "gemma3_text"]


def windows(n=6, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)


def context(model, w, batch_size=4):
    return PruneContext(model, None, Calibration(lambda: (w, {"test": True})), batch_size=batch_size)


def naive_nll(model, w, removed) -> float:
    """Calibration NLL of a deep copy of `model` without `removed`, by an ordinary full forward."""
    pruned = drop_layers(copy.deepcopy(model), removed)
    return window_nll(pruned, w, batch_size=len(w), progress=False).mean().item()


def naive_sleb(model, w, n):
    L = len(model.model.layers)
    removed, steps = [], []
    for _ in range(n):
        scores = {i: naive_nll(model, w, removed + [i]) for i in range(1, L - 1) if i not in removed}
        best = min(scores, key=lambda i: (scores[i], i))
        removed.append(best)
        steps.append(scores)
    return removed, steps


# ----------------------------------------------------------------------------- suffix machinery
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [1e9, 0])  # every position cached / only H_0 plus a walking buffer
def test_suffix_scores_equal_full_forward(arch, budget):
    model, w = tiny_model(arch, num_layers=5), windows()
    runner = Replay(model, w, batch_size=4)  # 6 windows: batches of 4 and 2
    kept = list(range(5))
    got = score_removals(runner, kept, kept, StreamCache(runner, kept, budget))
    for i in kept:
        assert got[i] == pytest.approx(naive_nll(model, w, [i]), rel=1e-6, abs=1e-6), (arch, i)


def test_prefix_cache_after_removals_matches_fresh_forward():
    model, w = tiny_model("llama", num_layers=6), windows()
    runner = Replay(model, w, batch_size=4)
    for budget in (1e9, 0):
        cache = StreamCache(runner, list(range(6)), budget)
        cache.get(4)
        cache.remove(2)  # kept [0, 1, 3, 4, 5]; H_2 now enters layer 3
        cache.remove(3)  # kept [0, 1, 3, 5]
        pruned = drop_layers(copy.deepcopy(model), [2, 4])
        seen = []

        def record(_module, args, seen=seen):
            seen.append(args[0])

        hooks = [layer.register_forward_pre_hook(record) for layer in pruned.model.layers]
        pruned(input_ids=w, use_cache=False)
        for h in hooks:
            h.remove()
        for p in (3, 1, 2, 0):
            torch.testing.assert_close(cache.get(p), seen[p], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- SLEB
@pytest.mark.parametrize("arch", ARCHS)
def test_sleb_matches_naive_greedy(arch):
    model, w = tiny_model(arch, num_layers=6), windows()
    order, steps = naive_sleb(model, w, n=3)
    for kw in ({"cache": True}, {"cache": True, "cache_gb": 0}, {"cache": False}):
        sel = SLEBPruner(n=3, **kw).select(context(model, w))
        assert sel.info["order"] == order, kw
        assert sel.removed == sorted(order)
        for got, want in zip(sel.info["steps"], steps, strict=True):
            assert [v is None for v in got["nll"]] == [i not in want for i in range(6)]
            assert [got["nll"][i] for i in want] == pytest.approx(list(want.values()), rel=1e-6, abs=1e-6)
        assert sel.info["scores"]["values"] == sel.info["steps"][0]["nll"]
        assert sel.info["scores"]["values"][0] is None and sel.info["scores"]["values"][-1] is None
        json.dumps(sel.info)


def test_sleb_cached_and_naive_scores_identical_and_call_counts():
    model, w = tiny_model("llama", num_layers=7), windows()
    L, n = 7, 3
    runs = {c: SLEBPruner(n=n, cache=c).select(context(model, w)) for c in (True, False)}
    assert runs[True].info["steps"] == runs[False].info["steps"]  # same layers on the same batches: bitwise
    # Naive: every candidate re-runs all other kept layers.
    naive = sum((L - 2 - s) * (L - 1 - s) for s in range(n))
    # Cached: each candidate at position p runs the len(kept)-p-1 layers after it; the prefix walk
    # computes positions (valid, last candidate position]; a removal at p keeps positions <= p valid.
    # (With this seed the order is [2, 5, 4]: a removal mid-walk, then one at the walk's end.)
    kept, valid, cached = list(range(L)), 0, 0
    for layer in runs[True].info["order"]:
        last = len(kept) - 2
        cached += sum(len(kept) - p - 1 for p in range(1, last + 1)) + max(0, last - valid)
        valid = min(kept.index(layer), last)
        kept.remove(layer)
    assert runs[False].info["layer_calls"] == naive
    assert runs[True].info["layer_calls"] == cached < naive
    assert runs[True].info["head_calls"] == runs[False].info["head_calls"] == sum(L - 2 - s for s in range(n))


# ----------------------------------------------------------------------------- PPL
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_ppl_matches_naive(arch):
    import math

    model, w = tiny_model(arch, num_layers=6), windows()
    want = {i: math.exp(naive_nll(model, w, [i])) for i in range(6)}
    sel = PPLPruner(n=2).select(context(model, w))
    assert sel.info["scores"]["values"] == pytest.approx([want[i] for i in range(6)], rel=1e-6)
    assert sel.removed == sorted(sorted(want, key=lambda i: (want[i], i))[:2])
    assert PPLPruner(n=2, cache=False).select(context(model, w)).info["scores"] == sel.info["scores"]


# ----------------------------------------------------------------------------- Taylor+
def naive_taylor(model, w):
    m = copy.deepcopy(model).float()
    m.zero_grad()
    m(input_ids=w, labels=w, use_cache=False).loss.backward()  # mean token NLL of equal-length windows
    return [sum((p * p.grad).abs().sum().item() for p in layer.parameters()) for layer in m.model.layers]


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_taylor_matches_full_batch_backward(micro_batch):
    model, w = tiny_model("llama", num_layers=9), windows()
    want = naive_taylor(model, w)
    sel = TaylorPruner(n=2, micro_batch=micro_batch).select(context(model, w))
    values = sel.info["scores"]["values"]
    assert values[:4] == [None] * 4 and values[-2:] == [None] * 2
    assert values[4:7] == pytest.approx(want[4:7], rel=1e-4)
    assert sel.removed == sorted(sorted(range(4, 7), key=lambda i: want[i])[:2])


def test_taylor_leaves_model_unchanged():
    model, w = tiny_model("qwen2", num_layers=8), windows()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[5].mlp.up_proj.weight.requires_grad_(False)
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    marker = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = marker
    TaylorPruner(n=1).select(context(model, w))
    assert not model.training
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k
        assert (p.grad is marker) if k == "lm_head.weight" else p.grad is None, k


# ----------------------------------------------------------------------------- disk cache
def test_disk_cache_reuses_scores_across_n(tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    model, w = tiny_model("llama", num_layers=8), windows()

    def ctx(key=1):
        return PruneContext(model, None, Calibration(lambda: (w, {"src": "test"})), cache_key={"k": key}, batch_size=4)

    fresh = SLEBPruner(n=4, disk_cache=False).select(ctx())
    SLEBPruner(n=2).select(ctx())  # stores 2 steps
    c4 = ctx()
    longer = SLEBPruner(n=4).select(c4)  # reuses 2, continues from the model without them
    assert longer.info["steps"] == fresh.info["steps"] and c4.calibration.built
    assert longer.info["disk_cache"]["reused_steps"] == 2
    assert 0 < longer.info["layer_calls"] < fresh.info["layer_calls"]
    c3 = ctx()
    shorter = SLEBPruner(n=3).select(c3)  # entirely from disk: calibration never built
    assert shorter.info["steps"] == fresh.info["steps"][:3] and shorter.removed == sorted(fresh.info["order"][:3])
    assert shorter.info["layer_calls"] == 0 and not c3.calibration.built
    assert c3.calibration.provenance == {"src": "test"}  # recorded with the cache entry
    assert SLEBPruner(n=1).select(ctx(key=2)).info["disk_cache"]["reused_steps"] == 0  # other calibration

    for cls in (PPLPruner, TaylorPruner):
        first = cls(n=1).select(ctx())
        c = ctx()
        again = cls(n=2).select(c)
        assert again.info["disk_cache"]["hit"] and not first.info["disk_cache"]["hit"] and not c.calibration.built
        assert c.calibration.provenance == {"src": "test"} and again.info["time_s"] == 0 and first.info["time_s"] > 0
        assert again.info["scores"] == first.info["scores"]
        assert again.removed == sorted(cls(n=2, disk_cache=False).select(ctx()).info["order"])

    path = Path(first.info["disk_cache"]["path"]) / "value.json"
    path.write_text("{not json")  # corrupt entry (same size or not): ignored, removed and recomputed
    assert TaylorPruner(n=1).select(ctx()).info["scores"] == first.info["scores"]
    assert json.loads(path.read_text())["value"]["scores"] == first.info["scores"]["values"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pruner,L,match", [
    (SLEBPruner(n=5), 6, r"pruner=sleb: pruner.n=5 out of range: .*first and last.*1 <= n <= 4"),
    (SLEBPruner(n=0), 6, r"pruner.n=0 out of range"),
    (PPLPruner(n=6), 6, r"pruner=ppl: pruner.n=6 out of range: at least one .* 1 <= n <= 5"),
    (TaylorPruner(n=3), 8, r"pruner=taylor: pruner.n=3 out of range: .*first 4 and last 2.* 1 <= n <= 2"),
    (TaylorPruner(n="2"), 8, r"pruner.n='2' must be an integer"),
])
def test_bad_n(pruner, L, match):
    with pytest.raises(ValueError, match=match):
        pruner.check(L)


def test_bad_settings():
    with pytest.raises(ValueError, match=r"pruner.cache_gb=-1 must be a number >= 0"):
        SLEBPruner(cache_gb=-1)
    with pytest.raises(ValueError, match=r"pruner.micro_batch=0 must be an integer >= 1"):
        TaylorPruner(micro_batch=0)
    with pytest.raises(ValueError, match=r"pruner=ppl: pruner.disk_cache='no' must be true or false"):
        PPLPruner(disk_cache="no")
    with pytest.raises(ValueError, match=r"pruner=sleb: pruner.cache=1 must be true or false"):
        SLEBPruner(cache=1)
    with pytest.raises(ValueError, match=r"pruner=taylor: pruner.disk_cache=None must be true or false"):
        TaylorPruner(disk_cache=None)
    model = tiny_model("llama", num_layers=6)
    with pytest.raises(ValueError, match=r"pruner.n=5 out of range"):  # checked again against the real model
        SLEBPruner(n=5).select(context(model, windows()))


# ----------------------------------------------------------------------------- pipeline
def compose_cfg(tmp_path, *overrides):
    """calib=quick on the validation split: tokenizing the 11 MB train split costs ~80 s here."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=[
            f"paths.output_dir={tmp_path}", f"data.root={DATA}", "model=tiny_llama", "calib=quick",
            "calib.split=validation", "eval=quick", "eval.ppl.max_windows=2", "eval.ppl.progress=false", *overrides])


@pytest.mark.slow
def test_run_sleb_end_to_end(tmp_path, monkeypatch):
    from lp.run import run

    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    result = run(compose_cfg(tmp_path, "pruner=sleb", "pruner.n=2"))
    saved = json.loads((tmp_path / "result.json").read_text())
    p = saved["pruning"]
    assert saved["status"] == "ok" and p["method"] == "sleb" and p["num_layers_after"] == 6
    assert p["removed_layers"] == sorted(p["order"]) and len(p["steps"]) == 2
    values = p["scores"]["values"]
    assert len(values) == 8 and values[0] is None and values[-1] is None
    assert p["order"][0] == min(range(1, 7), key=lambda i: (values[i], i))
    assert saved["data"]["calibration"]["nsamples"] == 16
    assert result["metrics"]["ppl/wikitext2"] > 1
    run(compose_cfg(tmp_path, "pruner=sleb", "pruner.n=1", "patch=rotate"))  # steps from disk, stats computed
    again = run(compose_cfg(tmp_path, "pruner=sleb", "pruner.n=2", "patch=rotate"))  # both from disk
    assert again["pruning"]["disk_cache"]["reused_steps"] == 2 and again["pruning"]["layer_calls"] == 0
    assert again["patch"]["calibration"]["cached"] is True
    assert again["data"]["calibration"] == saved["data"]["calibration"]  # provenance of the cached entries


def test_run_rejects_bad_n_before_loading(tmp_path):
    from lp.run import run

    with pytest.raises(ValueError, match="pruner=taylor: pruner.n=3 out of range"):
        run(compose_cfg(tmp_path, "pruner=taylor", "pruner.n=3"))  # tiny_llama: 8 layers, n <= 2
    assert "load" not in json.loads((tmp_path / "result.json").read_text())["timing"]
    with pytest.raises(ValueError, match=r"^pruner.disk_cache='no': must be true or false"):
        run(compose_cfg(tmp_path, "pruner=sleb", "pruner.disk_cache=no"))  # a setting: the constructor's own error
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["status"] == "failed" and "load" not in saved["timing"]
