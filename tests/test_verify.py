"""Held-out verification (`lp.verify`): the replay against the real pruned model, the planted-outlier
failure, the warning, `patch=auto`, the selection check and `pruner.rerank`."""

import copy
import json

import pytest
import torch
from conftest import SMALL
from omegaconf import OmegaConf
from planted import planted_model, ramp_windows
from test_calib import make_ctx
from test_report import _rec, _sweep

from lp import aggregate as agg
from lp import verify
from lp.candidates import Candidates, fit_candidates, ship
from lp.evaluate.ppl import window_nll
from lp.models import drop_layers, tiny_model
from lp.patch import LinearPatch, insert_patches, runs_of
from lp.pruners.base import Selection
from lp.run import preflight, run

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


def fit_and_verify(ctx, removed, cfg, held):
    """What `lp.run.make_patches` does: fit the candidates, verify them, ship."""
    cands = fit_candidates(ctx, removed, cfg)
    record, warnings = verify.verify_patches(held, cands)
    return (*ship(cands, record, warnings), warnings)


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    return model, make_ctx(model, ramp_windows(16, 32, 1), {}, batch_size=8), verify.Heldout(model, ramp_windows(8, 32, 2), 8)


def test_planted_massive_channels_rotate_worse_than_none_and_warned(planted):
    model, ctx, held = planted
    chosen, info, warnings = fit_and_verify(ctx, [3, 4, 5], patch_cfg("rotate"), held)
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
    chosen, info, warnings = fit_and_verify(ctx, [3, 4, 5], cfg, held)
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
    chosen, info, _ = fit_and_verify(ctx, [1, 4, 5], cfg, held)
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
    assert auto["patch"]["kind"] == "auto" and set(choice["candidates"]) == {"none", "scalar", "diag", "rotate", "lstsq", "lstsq_mlp"}
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
def test_run_bad_verification_settings_fail_before_loading(cfg_factory, overrides, msg):
    with pytest.raises(ValueError, match=msg):
        preflight(cfg_factory(*SMALL, "pruner=linearpatch", "pruner.n=2", *overrides))


# --------------------------------------------------------------------------- uncertainty (lp issue 26)
def test_paired_difference_mean_se_and_the_significance_rule():
    a, b = torch.tensor([3.0, 4.0, 5.0, 6.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    cmp = verify.paired(a, b)  # differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), SE sd/2
    assert cmp["n"] == 4 and cmp["diff"] == pytest.approx(2.5, abs=1e-12)
    assert cmp["se"] == pytest.approx((5 / 3) ** 0.5 / 2, abs=1e-12)
    assert cmp["z"] == pytest.approx(2.5 / cmp["se"]) and cmp["significant"]
    noisy = verify.paired(torch.tensor([5.0, -4.0, 4.0, -3.0]), torch.zeros(4))  # mean 0.5, SE ~2.3
    assert noisy["diff"] == pytest.approx(0.5) and not noisy["significant"]
    assert verify.beyond(cmp, 0.01) and not verify.beyond(noisy, 0.01) and not verify.better(cmp)
    one = verify.paired(torch.tensor([9.0]), torch.tensor([1.0]))  # one window: no SE, never significant
    assert one["se"] is None and one["z"] is None and not one["significant"]
    assert "+2.5000 ± 0.6455 nats (SE, n=4 windows, 3.9 SE)" == verify.describe(cmp)


@pytest.fixture(scope="module")
def pool():
    """Real forwards of a tiny Llama: the per-window NLL difference (patch - no patch) at the cut
    [2, 4) of a perturbing patch P = I + G/sqrt(D) over 48 random windows of 16 tokens. P is worse
    than no patch on some windows and better on others (sd ~0.08 nats)."""
    dense = tiny_model("llama", num_layers=8, hidden_size=D, seed=3)
    windows = torch.randint(0, 256, (48, 16), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    patch = LinearPatch(torch.eye(D) + torch.randn(D, D, generator=g) / D ** 0.5, 2, 4, 8)
    held = verify.Heldout(dense, windows, 8)
    return dense, windows, patch, held.window_nll([2, 3], {2: patch}) - held.window_nll([2, 3])


def window_sets(d: torch.Tensor, sign: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window indices where the patch is worse (sign=+1; better: -1) than none: `noisy` = the 5
    windows where it is most worse plus the 2 where it is most better (a large mean, a larger
    spread); `consistent` = every window where it is worse by 0.01..0.06 nats (small, steady)."""
    order = (sign * d).argsort(descending=True)
    noisy = torch.cat([order[:5], order[-2:]])
    consistent = torch.nonzero(((sign * d) > 0.01) & ((sign * d) < 0.06)).flatten()
    return noisy, consistent


def verify_on_windows(pool, idx, kind, own):
    dense, windows, patch, _ = pool
    held = verify.Heldout(dense, windows[idx], 4)
    fitted = {"none": {2: None}, "rotate": {2: patch}}  # P stands in for a fitted kind
    return verify.verify_patches(held, Candidates(kind, [2, 3], fitted, own))


def test_warning_needs_a_significant_difference_beyond_the_margin(pool):
    noisy, consistent = window_sets(pool[3], +1)
    loud, warn_loud = verify_on_windows(pool, noisy, "rotate", ["rotate"])
    steady, warn_steady = verify_on_windows(pool, consistent, "rotate", ["rotate"])
    big, small = loud["vs_none"]["rotate"], steady["vs_none"]["rotate"]
    # the construction: the noisy difference is the larger one, both exceed the margin, only one is >= 2 SE
    assert big["diff"] > small["diff"] > verify.PATCH_MARGIN and big["n"] == 7 and small["n"] >= 4
    assert big["se"] > 3 * small["se"] and abs(big["diff"]) < 2 * big["se"] and small["diff"] >= 2 * small["se"]
    assert warn_loud == []  # large but noisy: no warning
    (w,) = warn_steady  # small but consistent: warned, with the difference, its SE and n
    assert "patch=rotate is WORSE than no patch" in w
    assert f"{small['diff']:+.4f} ± {small['se']:.4f} nats (SE, n={small['n']} windows" in w
    for rec, cmp in ((loud, big), (steady, small)):  # result.json carries mean, SE and n of each comparison
        assert rec["nll"]["rotate"] - rec["nll"]["none"] == pytest.approx(cmp["diff"], abs=1e-9)
        assert rec["windows"] == cmp["n"] and "2 SE" in rec["rule"]
    assert json.loads(json.dumps(steady))["vs_none"]["rotate"]["significant"] is True


def test_auto_keeps_no_patch_unless_a_kind_is_significantly_better(pool):
    noisy, consistent = window_sets(pool[3], -1)
    loud, _ = verify_on_windows(pool, noisy, "auto", ["none", "rotate"])
    steady, _ = verify_on_windows(pool, consistent, "auto", ["none", "rotate"])
    (kept,), (chose,) = loud["choice"], steady["choice"]
    assert kept["best"] == "rotate" and kept["candidates"]["rotate"] < kept["candidates"]["none"] - 0.02
    assert not kept["best_vs_none"]["significant"]  # better on average, but not significantly
    assert kept["kind"] == "none" and kept["significant"] is False and loud["significant"] is False
    assert chose["kind"] == "rotate" and chose["significant"] is True and steady["significant"] is True
    assert chose["vs_runner_up"]["kind"] == "none" and chose["vs_runner_up"]["diff"] < 0
    assert steady["chosen_nll"] == pytest.approx(steady["nll"]["rotate"], abs=1e-12)


def test_tables_show_a_warning_with_its_uncertainty_and_no_mark_when_not_significant(pool, tmp_path):
    noisy, consistent = window_sets(pool[3], +1)
    records = [_rec("none", 0, ppl=9.0)]
    for pruner, idx in (("shortgpt", noisy), ("angular", consistent)):
        rec, warns = verify_on_windows(pool, idx, "rotate", ["rotate"])
        records.append(_rec(pruner, 2, "rotate", ppl=12.0, warnings=warns))
        records[-1]["patch"]["verification"] = rec
    paths = agg.write_all(_sweep(tmp_path, records))
    md, html = paths["table_md"].read_text(), paths["dashboard"].read_text()
    rows = [line for line in md.splitlines() if "+LinearPatch" in line]
    assert rows == ["| ShortGPT +LinearPatch | 12.00 |", "| Angular (Gromov) +LinearPatch ⚠ | 12.00 |"]
    (note,) = [line for line in md.splitlines() if line.startswith("- ⚠")]  # the significant one, with its SE
    assert "job 2: patch=rotate is WORSE than no patch" in note and " ± " in note and "SE, n=" in note
    assert "ShortGPT +LinearPatch ⚠" not in html and "Angular (Gromov) +LinearPatch ⚠" in html
    assert "is WORSE than no patch" in html and " ± " in html  # notes and job list carry the SE


# --------------------------------------------------------------------------- patch.verify_on
def test_run_verifies_on_a_validation_split_and_records_it(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    base = [*SMALL, "pruner=linearpatch", "pruner.n=2", "calib.nval=3", "eval.ppl.seqlen=48"]
    r = run(cfg_factory(*base, "patch=rotate", "patch.verify_on=wikitext2:validation"))
    v, check = r["patch"]["verification"], r["pruning"]["heldout_check"]
    assert v["data"]["on"] == "wikitext2:validation" and v["data"]["source"] == "local"
    assert v["data"]["seqlen"] == 48 and v["windows"] == v["data"]["windows"] == 3  # at eval.ppl.seqlen
    assert check["data"] == v["data"] and all(c["n"] == 3 for c in v["vs_none"].values())
    calib = run(cfg_factory(*base, "patch=rotate"))["patch"]["verification"]
    assert calib["data"]["on"] == "calib" and calib["data"]["seqlen"] == 64 and calib["data"]["corpus"] == "ptb"
    assert calib["nll"]["none"] != v["nll"]["none"]  # other windows decided


@pytest.mark.parametrize("overrides, msg", [
    (["patch.verify_on=ptb:test"], "patch.verify_on='ptb:test' is the split this run reports"),
    (["patch.verify_on=wikitext2_tok:test", "eval.ppl.datasets=[wikitext2]"], "is the split this run reports"),
    (["patch.verify_on=wikitext2"], "must be 'calib' or '<corpus>:<split>'"),
    (["patch.verify_on=ptb:dev"], "corpus 'ptb' has no split 'dev'"),
    (["patch.verify_on=wiki:validation"], "unknown corpus 'wiki'"),
])
def test_run_verifying_on_reported_or_unknown_data_fails_before_loading(cfg_factory, overrides, msg):
    with pytest.raises(ValueError, match=msg):
        preflight(cfg_factory(*SMALL, "pruner=linearpatch", "pruner.n=2", "patch=rotate", *overrides))


def test_rerank_keeps_the_scores_choice_unless_a_candidate_is_significantly_better(pool):
    dense, windows, _, _ = pool
    held = verify.Heldout(dense, windows, 8)
    d = held.window_nll([5, 6]) - held.window_nll([2, 3])  # the runner-up [5, 6] against the choice [2, 3]
    noisy, consistent = window_sets(d, -1)
    outcome = {}
    for name, idx in (("noisy", noisy), ("consistent", consistent)):
        sel = Selection([2, 3], {"alternatives": [[5, 6]]})
        outcome[name] = verify.check_selection(verify.Heldout(dense, windows[idx], 4), sel, rerank=2)[0]
    kept, moved = outcome["noisy"], outcome["consistent"]
    (_, runner) = kept.info["heldout_check"]["candidates"]
    assert runner["nll"] < kept.info["heldout_check"]["candidates"][0]["nll"]  # better on average ...
    assert not runner["vs_chosen"]["significant"] and runner["vs_chosen"]["n"] == 7  # ... but not significantly
    assert kept.removed == [2, 3] and kept.info["heldout_check"]["rerank_significant"] is False
    assert moved.removed == [5, 6] and moved.info["heldout_check"]["rerank_significant"] is True
    (first, _) = moved.info["heldout_check"]["candidates"]  # after the switch, compared with the new choice
    assert first["removed"] == [2, 3] and first["vs_chosen"]["diff"] > 0 and first["vs_chosen"]["significant"]


def test_tables_flag_a_verification_warning_recorded_without_uncertainty(tmp_path):
    old = ("patch=rotate is WORSE than no patch on held-out windows: NLL 7.1550 vs 7.0690 without (PPL x1.09); "
           "best here: none (7.0690); patch=auto would choose per cut")
    md = agg.write_all(_sweep(tmp_path, [_rec("none", 0, ppl=9.0), _rec("shortgpt", 3, "rotate", warnings=[old])]))[
        "table_md"].read_text()
    assert f"- ⚠ job 1: {old} [recorded without its uncertainty, before lp issue 26: may not be significant]" in md
