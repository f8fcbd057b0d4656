"""Held-out verification (`lp.verify`): the replay against the real pruned model, the planted-outlier
failure, the warning, `patch=auto`, the selection check and `pruner.rerank`."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from planted import planted_model, ramp_windows
from test_calib import make_ctx
from test_patch import SMALL

from lp import verify
from lp.evaluate.ppl import window_nll
from lp.models import drop_layers, tiny_model
from lp.patch import LinearPatch, insert_patches, runs_of
from lp.pruners.base import Selection
from lp.run import run

D = 64
KINDS = ["none", "scalar", "diag", "rotate", "lstsq", "rotate_outlier"]


def patch_cfg(kind, **kw):
    return OmegaConf.create({"kind": kind, "hadamard_fallback_seed": None, "ridge": 1e-4, "outlier_factor": 20.0,
                             "verify": ["none", "scalar", "diag", "rotate"], **kw})


@pytest.mark.parametrize("removed", [[2, 3], [0, 1, 5], [4, 6, 7]])
def test_heldout_nll_is_the_nll_of_the_pruned_patched_model(removed):
    dense = tiny_model("llama", num_layers=8, hidden_size=D, seed=3)
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    ps = {a: LinearPatch(torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / D ** 0.5, a, b, 8)
          for a, b in runs_of(removed)}
    held = verify.Heldout(dense, windows, batch_size=2)
    got = held.nll(removed, ps)
    pruned = insert_patches(drop_layers(copy.deepcopy(dense), removed), copy.deepcopy(ps))
    assert got == pytest.approx(window_nll(pruned, windows, 2, progress=False).mean().item(), abs=1e-5)
    assert held.nll([]) == pytest.approx(window_nll(dense, windows, 2, progress=False).mean().item(), abs=1e-5)
    unpatched = drop_layers(copy.deepcopy(dense), removed)
    assert held.nll(removed) == pytest.approx(window_nll(unpatched, windows, 2, progress=False).mean().item(), abs=1e-5)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, make_ctx(model, ramp_windows(16, 32, 1), {}, batch_size=8), verify.Heldout(model, ramp_windows(8, 32, 2), 8)


def test_planted_massive_channels_rotate_worse_than_none_and_warned(planted):
    model, ctx, held = planted
    chosen, info, warnings = verify.fit_and_verify(ctx, [3, 4, 5], patch_cfg("rotate"), held)
    nll = info["verification"]["nll"]
    assert set(nll) == {"none", "scalar", "diag", "rotate"}
    assert nll["rotate"] > nll["none"] + 0.5  # the failure of lp issue 14, reproduced
    assert nll["diag"] < nll["none"] - 0.2  # channel-wise scaling repairs this cut
    assert len(warnings) == 1 and warnings == info["warnings"]
    assert "patch=rotate is WORSE than no patch" in warnings[0] and "best here: diag" in warnings[0]
    assert [p.kind for p in chosen.values()] == ["rotate"]  # the configured patch is still what ships, loudly


def test_planted_auto_picks_the_better_kind_and_records_all_candidates(planted):
    model, ctx, held = planted
    cfg = patch_cfg("auto", candidates=KINDS, verify=[])
    chosen, info, warnings = verify.fit_and_verify(ctx, [3, 4, 5], cfg, held)
    v = info["verification"]
    (choice,) = v["choice"]
    assert set(choice["candidates"]) == set(KINDS) == set(v["nll"])
    assert choice["kind"] == min(choice["candidates"], key=choice["candidates"].get)
    assert choice["kind"] in ("diag", "lstsq", "rotate_outlier") and not warnings
    assert v["chosen_nll"] < v["nll"]["none"] - 0.2 < v["nll"]["rotate"]
    assert [p.kind for p in chosen.values()] == [choice["kind"]] and info["cuts"][0]["kind"] == choice["kind"]
    assert held.nll([3, 4, 5], chosen) == pytest.approx(v["chosen_nll"], abs=1e-6)


def test_auto_chooses_per_cut_and_may_choose_no_patch(planted):
    model, ctx, held = planted
    cfg = patch_cfg("auto", candidates=["none", "rotate"], verify=[])
    chosen, info, _ = verify.fit_and_verify(ctx, [1, 4, 5], cfg, held)
    choice = info["verification"]["choice"]
    assert [(c["start"], c["end"]) for c in choice] == [(1, 2), (4, 6)]
    for c in choice:  # each cut's pick is the best of its candidates, the other cut fixed
        assert c["kind"] == min(c["candidates"], key=c["candidates"].get)
    assert info["verification"]["chosen_nll"] <= min(info["verification"]["nll"].values()) + 1e-9
    assert sorted(chosen) == [c["start"] for c in choice if c["kind"] != "none"]


def test_check_selection_records_runner_ups_warns_and_reranks(planted):
    model, ctx, held = planted
    # a "score" that prefers the catastrophic [5, 6, 7] (the end: the patchless growth loss is largest)
    ranked = [[5, 6, 7], [4, 5, 6], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    sel = Selection(ranked[0], {"alternatives": ranked[1:]})
    same, warnings = verify.check_selection(held, Selection(sel.removed, dict(sel.info)), rerank=0)
    record = same.info["heldout_check"]
    assert "alternatives" not in same.info
    nll = {tuple(c["removed"]): c["nll"] for c in record["candidates"]}
    assert same.removed == ranked[0] and len(nll) == 1 + verify.CHECK_ALTERNATIVES
    for r in ranked[:4]:
        assert nll[tuple(r)] == pytest.approx(held.nll(r), abs=1e-9)
    best = min(nll, key=nll.get)
    assert best != tuple(ranked[0]) and nll[best] < nll[tuple(ranked[0])] - verify.RUNNER_UP_MARGIN
    assert len(warnings) == 1 and f"layers {list(best)}" in warnings[0] and "pruner.rerank=" in warnings[0]
    new, warnings = verify.check_selection(held, sel, rerank=5)
    record = new.info["heldout_check"]
    assert new.removed == min(ranked, key=held.nll) and record["reranked_from"] == ranked[0] and not warnings


# --------------------------------------------------------------------------- run(cfg)
def test_run_records_verification_and_auto(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    base = [*SMALL, "pruner=linearpatch", "pruner.n=3", "calib.nval=4"]
    rot = run(cfg_factory(*base, "patch=rotate"))
    v = rot["patch"]["verification"]
    assert v["windows"] == 4 and set(v["nll"]) == {"none", "scalar", "diag", "rotate"}
    assert rot["patch"]["warnings"] == [w for w in rot["warnings"] if w.startswith("patch=")]
    check = rot["pruning"]["heldout_check"]
    assert check["chosen"] == rot["pruning"]["removed_layers"] and len(check["candidates"]) == 4
    assert "alternatives" not in rot["pruning"]
    auto = run(cfg_factory(*base, "patch=auto"))
    (choice,) = auto["patch"]["verification"]["choice"]
    assert auto["patch"]["kind"] == "auto" and set(choice["candidates"]) == {"none", "scalar", "diag", "rotate", "lstsq"}
    assert auto["patch"]["num_patches"] == (choice["kind"] != "none")
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["patch"]["verification"]["choice"][0]["kind"] == choice["kind"]
    none = run(cfg_factory(*base))  # patch=none: the unpatched held-out NLL is still recorded
    assert none["patch"]["verification"]["nll"] == {"none": pytest.approx(v["nll"]["none"], abs=1e-9)}


@pytest.mark.parametrize("overrides, msg", [
    (["patch=auto", "calib.nval=0"], "patch=auto chooses by held-out NLL: needs calib.nval > 0"),
    (["pruner.rerank=3", "calib.nval=0"], "pruner.rerank chooses by held-out NLL"),
    (["pruner.rerank=1"], "pruner.rerank=1 must be 0"),
    (["patch=rotate", "patch.kind=rotat"], "did you mean 'rotate'"),
    (["patch=auto", "patch.candidates=[none,rotat]"], "patch.candidates entry='rotat'"),
    (["calib.nval=-1"], "calib.nval=-1 must be 0 .held-out checks off. or an integer >= 2"),
    (["calib.nval=1"], "calib.nval=1 must be 0"),
])
def test_run_bad_verification_settings_fail_before_loading(cfg_factory, tmp_path, overrides, msg):
    with pytest.raises(ValueError, match=msg):
        run(cfg_factory(*SMALL, "pruner=linearpatch", "pruner.n=2", *overrides))
    assert "load" not in json.loads((tmp_path / "result.json").read_text())["timing"]
