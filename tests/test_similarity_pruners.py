"""linearpatch / shortgpt / streamline / angular picks against naive picks on a tiny model."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_calib import make_ctx, naive_angular_last, naive_cos_channel, naive_cos_token, naive_states

from lp.calib import get_stats
from lp.models import tiny_model
from lp.pruners.angular import AngularPruner
from lp.pruners.linearpatch import LinearPatchPruner
from lp.pruners.shortgpt import ShortGPTPruner
from lp.pruners.streamline import StreamlinePruner

CONF = Path(__file__).resolve().parents[1] / "conf" / "pruner"
L = 8


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_layers=L, hidden_size=64, seed=3)
    windows = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(1))
    return model, windows, naive_states(model, windows)


def argbest(values: dict, lower=False):
    return (min if lower else max)(values, key=values.get)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_linearpatch_paper_and_streamline_pick_naive_block(setup, n):
    model, windows, h = setup
    naive = {i: naive_cos_token(h, i, i + n) for i in range(0, L - n + 1)}
    best = argbest(naive)
    ctx = make_ctx(model, windows, {})
    for pruner in (LinearPatchPruner(n, variant="paper"), StreamlinePruner(n)):
        sel = pruner.select(ctx)
        assert sel.removed == list(range(best, best + n))
        assert sel.info["scores"]["kind"] == "cosine_by_start"
        assert sel.info["scores"]["values"] == pytest.approx([naive[i] for i in range(L - n + 1)], abs=1e-5)


@pytest.mark.parametrize("n", [2, 4])
def test_linearpatch_reference_variant(setup, n):
    model, windows, h = setup
    naive = {i: naive_cos_channel(h, i, i + n) for i in range(1, L - n)}  # starts 1..L-n-1 only
    best = argbest(naive)
    sel = LinearPatchPruner(n, variant="reference").select(make_ctx(model, windows, {}))
    assert sel.removed == list(range(best, best + n))
    vals = sel.info["scores"]["values"]
    assert vals[0] is None and vals[-1] is None and len(vals) == L - n + 1
    assert vals[1:-1] == pytest.approx([naive[i] for i in range(1, L - n)], abs=1e-5)


@pytest.mark.parametrize("n", [2, 3])
def test_angular_picks_naive_block(setup, n):
    model, windows, h = setup
    naive = {j: naive_angular_last(h, j, j + n) for j in range(0, L - n + 1)}
    best = argbest(naive, lower=True)
    sel = AngularPruner(n).select(make_ctx(model, windows, {}))
    assert sel.removed == list(range(best, best + n))
    assert sel.info["scores"]["values"] == pytest.approx([naive[j] for j in range(L - n + 1)], abs=1e-4)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_shortgpt_removes_lowest_block_influence(setup, n):
    model, windows, h = setup
    bi = {i: 1 - naive_cos_token(h, i, i + 1) for i in range(L)}
    expected = sorted(sorted(bi, key=bi.get)[:n])
    sel = ShortGPTPruner(n).select(make_ctx(model, windows, {}))
    assert sel.removed == expected
    assert sel.info["scores"]["values"] == pytest.approx([bi[i] for i in range(L)], abs=1e-5)


def test_all_pruners_share_one_pass(setup):
    model, windows, _ = setup
    ctx = make_ctx(model, windows, {})
    stats = get_stats(ctx)
    for p in (LinearPatchPruner(2), ShortGPTPruner(2), StreamlinePruner(2), AngularPruner(2)):
        p.select(ctx)
    assert get_stats(ctx) is stats


@pytest.mark.parametrize("name, cls", [("linearpatch", LinearPatchPruner), ("shortgpt", ShortGPTPruner),
                                       ("streamline", StreamlinePruner), ("angular", AngularPruner)])
def test_configs_and_bad_n(name, cls):
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    pruner = instantiate(OmegaConf.create(raw))
    assert isinstance(pruner, cls) and pruner.name == name and pruner.n == 5 and pruner.needs_calibration
    pruner.check(30)
    for n, msg in [(0, "n=0 is out of range"), (-1, "n=-1 is out of range"), (8, "n=8 is out of range for a model of L=8")]:
        with pytest.raises(ValueError, match=f"pruner={name}.*{msg}"):
            cls(n).check(8)


def test_reference_variant_range_and_unknown_variant():
    LinearPatchPruner(6).check(8)
    with pytest.raises(ValueError, match="first and last layers are never removed.*1 <= n <= 6"):
        LinearPatchPruner(7, variant="reference").check(8)
    with pytest.raises(ValueError, match="pruner.variant='ref'; choose one of"):
        LinearPatchPruner(3, variant="ref")


@pytest.mark.slow
def test_second_run_loads_statistics_and_changed_seed_recomputes(cfg_factory, tmp_path, monkeypatch):
    """Through run(cfg): pruners and n share one cached pass; a new calibration seed is a new key."""
    from lp.run import run

    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    small = ["model=tiny_llama", "calib.corpus=ptb", "calib.split=test", "calib.nsamples=4", "calib.seqlen=64",
             "eval=quick", "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=2",
             "eval.ppl.progress=false"]
    runs = [run(cfg_factory(*small, "pruner=shortgpt", "pruner.n=2")),
            run(cfg_factory(*small, "pruner=angular", "pruner.n=3")),
            run(cfg_factory(*small, "pruner=angular", "pruner.n=3", "calib.seed=7"))]
    first, second, reseeded = (r["pruning"]["calibration"] for r in runs)
    assert first["cached"] is False and second["cached"] is True and reseeded["cached"] is False
    assert second["path"] == first["path"] != reseeded["path"]
    data = [r["data"]["calibration"] for r in runs]  # the loaded entry carries the provenance of its pass
    assert data[1] == data[0] and data[0]["seed"] == 2 and data[2]["seed"] == 7
    assert len(list((tmp_path / "cache" / "calib").iterdir())) == 2


def test_linearpatch_offers_the_other_rules_block_to_the_selection_check(monkeypatch):
    """The other variant's block is the first alternative: the held-out check names it when it is much
    better, and pruner.rerank=2 keeps the better of the two rules' blocks."""
    from types import SimpleNamespace

    import torch

    from lp.pruners import linearpatch
    from lp.verify import check_selection

    curves = {"paper": torch.tensor([0.1, 0.9, 0.2, 0.3, 0.0]),  # L = 6, n = 2: paper picks [1, 3)
              "reference": torch.tensor([float("nan"), 0.1, 0.2, 0.8, float("nan")])}  # reference: [3, 5)
    stats = SimpleNamespace(block_scores=lambda n, v: curves[v].clone(), cost={})
    monkeypatch.setattr(linearpatch, "get_stats", lambda ctx: stats)
    sel = LinearPatchPruner(2, variant="reference").select(None)
    assert sel.removed == [3, 4] and sel.info["other_variant"] == {"variant": "paper", "block": [1, 3]}
    assert sel.info["alternatives"][0] == [1, 2] and [1, 2] not in sel.info["alternatives"][1:]
    heldout = SimpleNamespace(num_windows=2, source={"on": "calib"},  # per-window NLL: 3.0 on [1, 2], else 3.5
                              window_nll=lambda removed, patches=None: torch.full((2,), 3.0 if removed == [1, 2] else 3.5))
    checked, warnings = check_selection(heldout, sel)
    assert checked.removed == [3, 4] and len(warnings) == 1
    assert "the block of pruner.variant=paper (layers [1, 2]) has held-out NLL 3.0000" in warnings[0]
    assert "pruner.rerank=2 would pick it" in warnings[0]
    sel = LinearPatchPruner(2, variant="reference", rerank=2).select(None)
    assert check_selection(heldout, sel, rerank=2)[0].removed == [1, 2]
    curves["reference"] = torch.tensor([float("nan"), 0.9, 0.2, 0.1, float("nan")])
    same = LinearPatchPruner(2, variant="paper").select(None)  # same block under both rules: nothing added
    assert same.info["other_variant"]["block"] == [1, 3] and [1, 2] not in same.info["alternatives"]
