"""One-pass calibration statistics (`lp.calib`) against a deliberately naive computation."""

import math

import pytest
import torch

from lp import calib
from lp.calib import Calibration, CalibStats, _symmetric, check_block, collect, get_stats
from lp.hadamard import Rotation, hadamard
from lp.models import Decoder, tiny_model
from lp.pruners.base import PruneContext


# --------------------------------------------------------------------------- naive reference
def naive_states(model, windows) -> list[torch.Tensor]:
    """h_0..h_L as float64 [W, T, D]: the embedding output and every layer's output, stored in full,
    one window at a time, with plain forward hooks (no pre-hooks, no early stop)."""
    dec = Decoder(model)
    outs = []
    grab = lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)  # noqa: E731
    hooks = [dec.backbone.embed_tokens.register_forward_hook(grab)]
    hooks += [layer.register_forward_hook(grab) for layer in dec.layers]
    per_window = []
    with torch.no_grad():
        for w in windows:
            outs.clear()
            model(input_ids=w[None], use_cache=False)
            per_window.append([o[0].double() for o in outs])
    for h in hooks:
        h.remove()
    return [torch.stack([pw[i] for pw in per_window]) for i in range(dec.num_layers + 1)]


def cosine(x, y):
    return float(x @ y / (x.norm() * y.norm()))


def naive_cos_token(h, a, b):
    W, T, _ = h[a].shape
    return sum(cosine(h[a][w, t], h[b][w, t]) for w in range(W) for t in range(T)) / (W * T)


def naive_cos_channel(h, a, b):
    """The reference code's `torch.cosine_similarity(act[i], act[j]).mean()` (dim=1: over tokens), per window."""
    W = h[a].shape[0]
    return sum(torch.cosine_similarity(h[a][w:w + 1], h[b][w:w + 1]).mean().item() for w in range(W)) / W


def naive_angular_last(h, a, b):
    W = h[a].shape[0]
    return sum(math.acos(max(-1.0, min(1.0, cosine(h[a][w, -1], h[b][w, -1])))) / math.pi for w in range(W)) / W


def naive_scales(h, a, b, kind):
    H = hadamard(h[a].shape[-1], dtype=torch.float64) if kind == "rotate" else None
    ratios = []
    for w in range(h[a].shape[0]):
        xa, xb = h[a][w], h[b][w]
        if H is not None:
            xa, xb = xa @ H, xb @ H
        ratios.append(xb.abs().mean(0) / xa.abs().mean(0))
    return torch.stack(ratios).mean(0)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_layers=6, hidden_size=64, seed=1)
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    stats = collect(model, windows, batch_size=2, rotation=Rotation(64))  # 2 + 2 + 1 windows
    return model, windows, stats, naive_states(model, windows)


# --------------------------------------------------------------------------- tests
def test_similarities_match_naive(setup):
    model, windows, stats, h = setup
    L = 6
    assert stats.cos_token.shape == (L + 1, L + 1) and stats.abs_mean.shape == (5, L + 1, 64)
    for a in range(L + 1):
        for b in range(a + 1, L + 1):
            assert stats.cos(a, b) == pytest.approx(naive_cos_token(h, a, b), abs=1e-5)
            assert stats.cos(b, a) == stats.cos(a, b)
            assert stats.cos(a, b, "channel") == pytest.approx(naive_cos_channel(h, a, b), abs=1e-5)
            assert stats.cos(a, b, "last") == pytest.approx(
                sum(cosine(h[a][w, -1], h[b][w, -1]) for w in range(5)) / 5, abs=1e-5)
            assert float(stats.ang_last[a, b]) == pytest.approx(naive_angular_last(h, a, b), abs=1e-4)


def test_every_similarity_matrix_is_symmetric_bit_for_bit(setup):
    *_, stats, _ = setup
    for name in ("cos_token", "cos_last", "ang_last", "cos_channel"):
        m = getattr(stats, name)
        assert torch.equal(m, m.T), name


def test_symmetric_mirrors_the_upper_triangle_of_a_non_symmetric_gram():
    # Two float32 Gram products of the same rows summed in different orders differ in the last bits,
    # as BLAS kernels of different CPUs do; _symmetric must give an exactly symmetric matrix anyway.
    x = torch.randn(7, 4099, generator=torch.Generator().manual_seed(0))
    g = (x @ x.T).double()
    g_other_order = (x.flip(1) @ x.flip(1).T).double()
    g[3:, :3] = g_other_order[3:, :3]  # lower block from the other summation order
    assert not torch.equal(g, g.T)  # the input really is asymmetric
    s = _symmetric(g)
    assert torch.equal(s, s.T)
    assert torch.equal(torch.triu(s), torch.triu(g))  # the upper triangle is kept as computed


@pytest.mark.parametrize("a, b", [(0, 2), (1, 4), (3, 6), (5, 6)])
@pytest.mark.parametrize("kind", ["diag", "rotate"])
def test_scales_match_naive(setup, a, b, kind):
    *_, stats, h = setup
    torch.testing.assert_close(stats.scales(a, b, kind).double(), naive_scales(h, a, b, kind), atol=1e-4, rtol=1e-4)


def test_abs_means_match_naive(setup):
    *_, stats, h = setup
    for i in range(7):
        torch.testing.assert_close(stats.abs_mean[:, i].double(), h[i].abs().mean(1), atol=1e-5, rtol=1e-5)


def test_block_scores_and_candidate_ranges(setup):
    *_, stats, h = setup
    paper = stats.block_scores(2)
    assert paper.shape == (5,) and paper[3] == pytest.approx(naive_cos_token(h, 3, 5), abs=1e-5)
    ref = stats.block_scores(2, "reference")  # starts 1..L-n-1 = 1..3
    assert math.isnan(ref[0]) and math.isnan(ref[4]) and not ref[1:4].isnan().any()
    assert ref[2] == pytest.approx(naive_cos_channel(h, 2, 4), abs=1e-5)


def test_final_norm_never_runs_and_batching_does_not_matter(setup):
    model, windows, stats, _ = setup
    calls = []
    handle = Decoder(model).norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        one = collect(model, windows, batch_size=1, rotation=Rotation(64))
    finally:
        handle.remove()
    assert calls == []
    for k in CalibStats.TENSORS:
        torch.testing.assert_close(getattr(one, k), getattr(stats, k), atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(setup, tmp_path):
    *_, stats, _ = setup
    stats.save(tmp_path / "s")
    back = CalibStats.load(tmp_path / "s")
    for k in CalibStats.TENSORS:
        assert torch.equal(getattr(back, k), getattr(stats, k))
    assert back.meta == stats.meta


def make_ctx(model, windows, key, batch_size=2):
    return PruneContext(model, None, Calibration(lambda: (windows, {"windows": len(windows)})), cache_key=key,
                        batch_size=batch_size)


def test_get_stats_caches_on_disk_and_recomputes_on_new_key(setup, tmp_path, monkeypatch):
    model, windows, _, _ = setup
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path))
    calls = []
    real = calib.collect
    monkeypatch.setattr(calib, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    key = {"model": "tiny", "calib": {"seed": 0}}
    ctx = make_ctx(model, windows, key)
    first = get_stats(ctx)
    assert len(calls) == 1 and first.cost["cached"] is False and ctx.calibration.built
    assert get_stats(ctx) is first  # one pass per run: memoised by the run's Calibration
    again_ctx = make_ctx(model, windows, key)
    again = get_stats(again_ctx)
    assert len(calls) == 1 and again.cost["cached"] is True and not again_ctx.calibration.built
    assert torch.equal(again.cos_token, first.cos_token) and torch.equal(again.abs_mean_rot, first.abs_mean_rot)
    assert again.meta["calibration"] == {"windows": 5}
    other = get_stats(make_ctx(model, windows[:3], {"model": "tiny", "calib": {"seed": 1}}))
    assert len(calls) == 2 and other.cost["cached"] is False and other.meta["windows"] == 3
    assert len(list((tmp_path / "calib").iterdir())) == 2
    get_stats(make_ctx(model, windows, {}))  # no key: no disk cache
    assert len(calls) == 3 and len(list((tmp_path / "calib").iterdir())) == 2


@pytest.mark.parametrize("n, variant, msg", [
    (0, "paper", "n=0 is out of range .* 1 <= n <= 5"),
    (6, "paper", "n=6 is out of range for a model of L=6"),
    (5, "reference", "first and last layers are never removed.*1 <= n <= 4"),
    (2.5, "paper", "must be an integer"),
    (2, "both", "variant='both'; choose one of"),
])
def test_check_block_errors(n, variant, msg):
    with pytest.raises(ValueError, match=msg):
        check_block("pruner=x", n, 6, variant)
