"""The patch vocabulary (`lp.patches`): one registry, every kind against a naive computation."""

import pytest
import torch
from conftest import CONF
from omegaconf import OmegaConf
from planted import MASSIVE, planted_model, ramp_windows
from test_calib import make_ctx, naive_scales, naive_states

from lp import patches
from lp.hadamard import hadamard
from lp.models import tiny_model
from lp.patch import CUT_FIELDS, check_patch, cut_record, fit_patches
from lp.patches.base import collect_cuts
from lp.patches.lstsq import ridge_solve

D = 64


def cfg(**kw):
    return OmegaConf.create({"kind": "rotate", "hadamard_fallback_seed": None, **kw})


@pytest.fixture(scope="module")
def dense():
    model = tiny_model("llama", num_layers=6, hidden_size=D, seed=4)
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(2))
    return model, windows, naive_states(model, windows)


# --------------------------------------------------------------------------- registry
def test_every_patch_yaml_is_a_registered_kind_and_back():
    yaml_kinds = {OmegaConf.load(p).kind for p in (CONF / "patch").glob("*.yaml") if not p.stem.startswith("_")}
    assert yaml_kinds == set(patches.KINDS) | set(patches.CHOICES)
    for name, kind in patches.KINDS.items():
        assert kind.name == name and kind.paper  # each kind says where it comes from


def test_unknown_kind_names_the_valid_ones_with_a_suggestion():
    with pytest.raises(ValueError, match=r"patch.kind='rotat' is not a patch kind \(did you mean 'rotate'\?\)"):
        patches.check_name("rotat")
    with pytest.raises(ValueError, match="patch.candidates entry='auto'"):
        check_patch(cfg(kind="auto", candidates=["none", "auto"]), D)
    with pytest.raises(ValueError, match="patch=auto needs patch.candidates"):
        check_patch(cfg(kind="auto", candidates=[]), D)
    with pytest.raises(ValueError, match="patch.ridge=-1"):
        check_patch(cfg(kind="lstsq", ridge=-1), D)
    with pytest.raises(ValueError, match="patch=rotate_outlier: No Hadamard"):
        check_patch(cfg(kind="rotate_outlier"), 184)
    check_patch(cfg(kind="diag", verify=["none", "rotate"]), 184)  # verify skips what cannot be built


# --------------------------------------------------------------------------- kinds vs naive
def test_collect_cuts_captures_the_dense_states_at_every_cut(dense):
    model, windows, h = dense

    class Keep:
        def __init__(self):
            self.a, self.b = [], []

        def update(self, xa, xb):
            self.a.append(xa.double())
            self.b.append(xb.double())

    jobs = {k: (k, Keep()) for k in [(0, 2), (1, 6), (3, 4)]}
    collect_cuts(model, windows, 2, jobs)
    for (a, b), acc in jobs.values():
        torch.testing.assert_close(torch.cat(acc.a), h[a], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat(acc.b), h[b], atol=1e-5, rtol=1e-5)  # h_6 = before the final norm


def test_scalar_diag_rotate_against_naive_scales(dense):
    model, windows, h = dense
    fitted, info = fit_patches(make_ctx(model, windows, {}), [1, 2, 5], cfg(), ["scalar", "diag", "rotate"])
    H = hadamard(D, dtype=torch.float64)
    for a, b in [(1, 3), (5, 6)]:
        s_diag, s_rot = naive_scales(h, a, b, "diag"), naive_scales(h, a, b, "rotate")
        torch.testing.assert_close(fitted["diag"][a].weight.double(), torch.diag(s_diag), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fitted["rotate"][a].weight.double(), H @ torch.diag(s_rot) @ H.T,
                                   atol=1e-5, rtol=1e-5)
        p = fitted["scalar"][a]  # Prune&Comp: one ratio, the mean over channels of the per-channel ratios
        assert p.kind == "scalar"
        torch.testing.assert_close(p.weight.double(), s_diag.mean() * torch.eye(D, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)
    assert [c["start"] for c in info["cuts"]["scalar"]] == [1, 5]


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_lstsq_against_torch_linalg_lstsq(dense, ridge):
    model, windows, h = dense
    fitted, info = fit_patches(make_ctx(model, windows, {}), [2, 3], cfg(kind="lstsq", ridge=ridge), ["lstsq"])
    X, Y = h[2].reshape(-1, D), h[4].reshape(-1, D)
    lam = ridge * (X * X).sum() / D
    A = torch.cat([X, lam.sqrt() * torch.eye(D, dtype=X.dtype)])  # ridge as extra rows
    B = torch.cat([Y, torch.zeros(D, D, dtype=Y.dtype)])
    want = torch.linalg.lstsq(A, B, driver="gelsd").solution
    got = fitted["lstsq"][2].weight.double()
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert info["cuts"]["lstsq"][0]["tokens"] == X.shape[0]


def test_every_kind_writes_complete_cut_records(dense):
    """Each cut record has exactly the `CutRecord` fields, its own kind, and the kind's numbers filled."""
    model, windows, _ = dense
    kinds = [k for k in patches.KINDS if k != "none"]
    _, info = fit_patches(make_ctx(model, windows, {}), [1, 2, 5], cfg(), kinds)
    filled = {"scalar": ["scale"], "diag": ["scale_median"], "rotate": ["scale_median"],
              "rotate_outlier": ["massive_channels", "scale_median"], "lstsq": ["ridge", "tokens"],
              "lstsq_mlp": ["ridge", "tokens"], "rotate_mlp": ["ridge", "tokens", "scale_median"]}
    for kind in kinds:
        for rec, (a, b) in zip(info["cuts"][kind], [(1, 3), (5, 6)], strict=True):
            assert tuple(rec) == CUT_FIELDS
            assert (rec["start"], rec["end"], rec["before"], rec["kind"]) == (a, b, b if b < 6 else "norm", kind)
            assert all(rec[k] is not None for k in filled[kind]), (kind, rec)
    with pytest.raises(ValueError, match=r"patch kind 'mine' reports \['gain'\]: not fields of lp.patch.CutRecord"):
        cut_record(1, 3, 6, "mine", {"gain": 2.0})


def test_ridge_solve_handles_a_singular_system():
    x = torch.randn(3, 5, dtype=torch.float64)  # fewer tokens than dims, no ridge
    W = ridge_solve(x.T @ x, x.T @ x, 0.0)
    torch.testing.assert_close(x @ W, x, atol=1e-8, rtol=1e-8)


def test_rotate_outlier_against_naive_and_equal_to_rotate_without_outliers():
    model = planted_model()
    windows = ramp_windows(6, 16, 1)
    h = naive_states(model, windows)
    ctx = make_ctx(model, windows, {})
    fitted, info = fit_patches(ctx, [3, 4, 5], cfg(outlier_factor=20.0), ["rotate_outlier"])
    cut = info["cuts"]["rotate_outlier"][0]
    assert cut["massive_channels"] == MASSIVE
    H = hadamard(D, dtype=torch.float64)
    keep = torch.ones(D, dtype=torch.float64)
    keep[MASSIVE] = 0
    ra = torch.stack([((h[3][w] * keep) @ H).abs().mean(0) for w in range(6)])
    rb = torch.stack([((h[6][w] * keep) @ H).abs().mean(0) for w in range(6)])
    want = torch.diag(keep) @ H @ torch.diag((rb / ra).mean(0)) @ H.T @ torch.diag(keep)
    want[MASSIVE, MASSIVE] = naive_scales(h, 3, 6, "diag")[MASSIVE]
    torch.testing.assert_close(fitted["rotate_outlier"][3].weight.double(), want, atol=1e-4, rtol=1e-4)
    # nothing above the threshold: exactly the paper's rotate
    both, _ = fit_patches(ctx, [3, 4, 5], cfg(outlier_factor=1e9), ["rotate_outlier", "rotate"])
    torch.testing.assert_close(both["rotate_outlier"][3].weight, both["rotate"][3].weight, atol=1e-5, rtol=1e-5)
