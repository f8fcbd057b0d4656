"""The rotation bases of `lp.hadamard`: the official code's matrix (QuaRot tables + Walsh-Hadamard),
seeded random bases, and `Rotation` (fast x -> x H) for every kind."""

import math

import pytest
import torch

from lp import hadamard as hd
from lp.hadamard import OFFICIAL_ORDERS, Rotation, basis, hadamard, official_factorize, official_table, spec


# --------------------------------------------------------------------------- the official definition, literally
def ref_get_hadK(n):
    """QuaRot's get_hadK: the first K of its if/elif chain dividing n; assert n / K is a power of two."""
    for k in (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12):
        if n % k == 0:
            assert (n // k) & (n // k - 1) == 0
            return official_table(k), k
    assert n & (n - 1) == 0
    return None, 1


def ref_matmul_hadU(X):
    """QuaRot's matmul_hadU: butterflies on the middle axis until K is left, then hadK @, / sqrt(n)."""
    n = X.shape[-1]
    hadK, K = ref_get_hadK(n)
    inp = X.clone().view(-1, n, 1)
    out = inp.clone()
    while inp.shape[1] > K:
        inp = inp.view(inp.shape[0], inp.shape[1] // 2, 2, inp.shape[2])
        out = out.view(inp.shape)
        out[:, :, 0, :] = inp[:, :, 0, :] + inp[:, :, 1, :]
        out[:, :, 1, :] = inp[:, :, 0, :] - inp[:, :, 1, :]
        out = out.view(inp.shape[0], inp.shape[1], -1)
        inp, out = out, inp
    if K > 1:
        inp = hadK.view(1, K, K).to(inp) @ inp
    return inp.view(X.shape) / torch.tensor(n).sqrt()


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("k", OFFICIAL_ORDERS)
def test_each_table_is_hadamard(k):
    t = official_table(k)
    assert t.shape == (k, k) and torch.equal(t.abs(), torch.ones(k, k))
    assert torch.equal(t @ t.T, k * torch.eye(k, dtype=torch.float64))


def test_tables_match_quarot_source_rows():
    """Rows typed from QuaRot's hadamard_utils.py (get_had12 rows 0-1, get_had20 row 1, get_had28 row 0)."""
    p, m = 1, -1
    assert official_table(12)[0].tolist() == [p] + [m] * 11
    assert official_table(12)[1].tolist() == [p, p, m, p, m, m, m, p, p, p, m, p]
    assert official_table(20)[1].tolist() == [p, p, m, p, p, m, m, m, m, p, m, p, m, p, p, p, p, m, m, p]
    assert official_table(28)[0].tolist() == [p] * 14 + [m] + [p] * 13


# --------------------------------------------------------------------------- the combined matrix
EXPECTED = {4096: (1, 4096), 5120: (40, 128), 3584: (28, 128), 576: (36, 16), 1536: (12, 128),
            3072: (12, 256), 2048: (1, 2048), 12: (12, 1), 172 * 4: (172, 4), 280: (140, 2)}


def test_official_factorisation_follows_get_hadK_order():
    assert {d: official_factorize(d) for d in EXPECTED} == EXPECTED
    # first dividing K leaves no power of two -> the official code asserts -> unsupported here
    for d in (1680, 60 * 3, 7, 0, -4):
        assert official_factorize(d) is None and spec(d, "official") is None


@pytest.mark.parametrize("dim", [576, 3584, 5120, 4096, 12, 280, 640])
def test_official_equals_matmul_hadU_of_identity_bit_for_bit(dim):
    H = basis(dim, "official", dtype=torch.float32)
    assert torch.equal(H, ref_matmul_hadU(torch.eye(dim)))
    assert H.dtype == torch.float32
    # closed form: (T_K^T kron Sylvester) / float32 sqrt(D)
    k, p = official_factorize(dim)
    t = official_table(k).T.contiguous() if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    assert torch.equal(H.double().sign(), torch.kron(t, hd._sylvester(p).double()))
    assert torch.equal(H.abs(), torch.full_like(H, 1.0) / torch.tensor(dim).sqrt())


@pytest.mark.parametrize("dim", [576, 5120])
def test_official_float64_bit_for_bit_and_orthonormal(dim):
    H = basis(dim, "official", dtype=torch.float64)
    assert torch.equal(H, ref_matmul_hadU(torch.eye(dim, dtype=torch.float64)))
    assert (H @ H.T - torch.eye(dim, dtype=torch.float64)).abs().max() < 1e-6  # sqrt(D) rounded to float32


def test_official_differs_from_constructed_beyond_signed_permutation():
    Hc, Ho = basis(576, "constructed"), basis(576, "official")
    M = (Hc.T @ Ho).abs()  # a signed permutation would give a 0/1 matrix
    assert ((M > 1e-9) & ((M - 1).abs() > 1e-9)).any()


def test_unsupported_official_size_errors_or_falls_back():
    with pytest.raises(ValueError, match=r"No official \(QuaRot-table\) Hadamard matrix for D = 1680"):
        basis(1680, "official")
    assert spec(1680, "official", fallback_seed=4) == "random_orthogonal:4"
    Q = basis(1680 // 16, "official", fallback_seed=4)  # 105: odd, no construction at all
    assert torch.allclose(Q @ Q.T, torch.eye(105, dtype=torch.float64), atol=1e-10)


# --------------------------------------------------------------------------- random bases
@pytest.mark.parametrize("kind", ["random", "random_hadamard"])
def test_random_bases_seeded_orthonormal(kind):
    a, b, c = basis(576, kind, 1), basis(576, kind, 1), basis(576, kind, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a @ a.T - torch.eye(576, dtype=torch.float64)).abs().max() < 1e-10
    assert spec(576, kind, 7) == f"{kind}:7"


def test_random_hadamard_is_row_signed_official():
    z = torch.diagonal(basis(576, "random_hadamard", 3) @ basis(576, "official").T)
    assert torch.allclose(z.abs(), torch.ones(576, dtype=torch.float64)) and (z < 0).any() and (z > 0).any()


@pytest.mark.parametrize("kind, seed, match", [
    ("hadamard", None, r"patch.hadamard='hadamard'; choose one of \['constructed', 'official', 'random'"),
    ("random", None, "patch.hadamard=random needs an integer patch.hadamard_seed, got None"),
    ("random_hadamard", "1", "needs an integer patch.hadamard_seed, got '1'"),
    ("official", 3, "patch.hadamard_seed=3 is only used by the random bases"),
])
def test_bad_basis_settings(kind, seed, match):
    with pytest.raises(ValueError, match=match):
        spec(576, kind, seed)


# --------------------------------------------------------------------------- Rotation (moved from calib)
@pytest.mark.parametrize("dim, kind, seed", [
    (64, "constructed", None), (576, "constructed", None), (5120, "constructed", None),
    (576, "official", None), (5120, "official", None), (4096, "official", None), (12, "official", None),
    (576, "random", 5), (576, "random_hadamard", 5), (3584, "random_hadamard", 1),
])
def test_rotation_equals_dense_basis(dim, kind, seed):
    r = Rotation(dim, kind, seed)
    x = torch.randn(7, 3, dim, generator=torch.Generator().manual_seed(dim))
    ref = x.double() @ basis(dim, kind, seed)
    torch.testing.assert_close(r.apply(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(r.matrix(), basis(dim, kind, seed)) and r.spec == spec(dim, kind, seed)


def test_rotation_unsupported_size_needs_fallback_seed():
    with pytest.raises(ValueError, match="No Hadamard matrix construction for D = 52"):
        Rotation(52)
    r = Rotation(52, fallback_seed=3)
    assert r.spec == "random_orthogonal:3"
    x = torch.randn(4, 52)
    ref = x.double() @ hadamard(52, dtype=torch.float64, fallback_seed=3)
    torch.testing.assert_close(r.apply(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_constructed_basis_is_the_hadamard_function():
    assert torch.equal(basis(576, "constructed", dtype=torch.float32), hadamard(576))
    assert math.isclose(float(basis(576).abs().max()), 1 / 24)


@pytest.mark.parametrize("kind, seed", [("constructed", None), ("official", None), ("random_hadamard", 2)])
def test_rotation_of_half_precision_activations(kind, seed):
    """bf16 x: one bf16 matmul with the exact ±1 matrix; only the result is rounded (to bf16)."""
    r = Rotation(576, kind, seed)
    x = torch.randn(2, 5, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = x.double() @ basis(576, kind, seed)
    y = r.apply(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6)
    assert not torch.equal(y, r.apply(x.float()))  # the float32 path is the exact one
