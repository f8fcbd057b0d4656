import math

import pytest
import torch

from lp.hadamard import base_orders, factorize, hadamard, paley, supported

PAPER_SIZES = [4096, 5120, 3584, 576, 640, 896, 960, 1536, 2048, 3072]
EXPECTED_FACTORS = {
    4096: (4096, 1), 5120: (256, 20), 3584: (128, 28), 576: (16, 36), 640: (32, 20),
    896: (32, 28), 960: (16, 60), 1536: (128, 12), 2048: (2048, 1), 3072: (256, 12),
}


@pytest.mark.parametrize("dim", PAPER_SIZES)
def test_paper_sizes_orthonormal(dim):
    assert supported(dim)
    H = hadamard(dim)  # float32 keeps the full D^3 Gram check fast on CPU
    assert H.shape == (dim, dim) and H.dtype == torch.float32
    assert torch.equal(H.abs(), torch.full_like(H, 1 / math.sqrt(dim)))
    err = (H @ H.T - torch.eye(dim)).abs().max().item()
    assert err < 1e-5


def test_paper_size_factorisations():
    assert {d: factorize(d) for d in PAPER_SIZES} == EXPECTED_FACTORS


def test_float32_matches_float64_cast():
    H32, H64 = hadamard(960), hadamard(960, dtype=torch.float64)
    assert H32.dtype == torch.float32
    assert torch.equal(H32, H64.to(torch.float32))
    assert torch.allclose(H32 @ H32.T, torch.eye(960), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_device(dtype):
    H = hadamard(640, dtype=dtype, device="cpu")
    assert H.dtype == dtype and H.device.type == "cpu"
    assert torch.equal(H, hadamard(640, dtype=torch.float64).to(dtype))


def test_returns_fresh_copy():
    for kw in ({}, {"dtype": torch.float64}):
        hadamard(12, **kw).zero_()
        assert hadamard(12, **kw).abs().min() > 0
        hadamard(7, fallback_seed=0, **kw).zero_()
        assert hadamard(7, fallback_seed=0, **kw).abs().max() > 0


@pytest.mark.parametrize("m", base_orders())
def test_base_matrices_are_hadamard(m):
    B = paley(m)
    assert B.shape == (m, m)
    assert torch.equal(B.abs(), torch.ones_like(B))
    assert torch.equal(B @ B.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("m", [4, 8, 24, 48, 72])  # redundant Paley orders also valid
def test_redundant_paley_orders(m):
    B = paley(m)
    assert torch.equal(B @ B.T, m * torch.eye(m, dtype=torch.float64))


def test_small_supported_sizes_and_factorize():
    for d in range(1, 257):
        f = factorize(d)
        if f is None:
            assert not supported(d)
            continue
        p, m = f
        assert p * m == d and p & (p - 1) == 0 and m in base_orders(m)
        H = hadamard(d, dtype=torch.float64)
        assert torch.allclose(H @ H.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert [d for d in range(1, 17) if supported(d)] == [1, 2, 4, 8, 12, 16]


@pytest.mark.parametrize("dim", [3, 7, 1001, 52])
def test_unsupported_raises(dim):
    assert not supported(dim) and factorize(dim) is None
    with pytest.raises(ValueError, match=rf"D = {dim}\b") as exc:
        hadamard(dim)
    msg = str(exc.value)
    assert "2^k" in msg and "fallback_seed" in msg and "12, 20, 28" in msg


@pytest.mark.parametrize("dim", [0, -4, 2.0, True])
def test_invalid_dims_raise(dim):
    with pytest.raises(ValueError):
        hadamard(dim, fallback_seed=0)


def test_non_float_dtype_raises():
    with pytest.raises(ValueError):
        hadamard(16, dtype=torch.int64)


def test_fallback_random_orthogonal():
    Q = hadamard(1001, dtype=torch.float64, fallback_seed=3)
    assert Q.shape == (1001, 1001)
    assert torch.allclose(Q @ Q.T, torch.eye(1001, dtype=torch.float64), atol=1e-10)
    assert torch.equal(Q, hadamard(1001, dtype=torch.float64, fallback_seed=3))
    assert not torch.allclose(Q, hadamard(1001, dtype=torch.float64, fallback_seed=4))
    Q32 = hadamard(7, fallback_seed=0)
    assert Q32.dtype == torch.float32
    assert torch.allclose(Q32 @ Q32.T, torch.eye(7), atol=1e-5)


def test_fallback_ignored_for_supported_size():
    assert torch.equal(hadamard(576, fallback_seed=1), hadamard(576))


def test_kronecker_convention():
    S2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    expected = torch.kron(torch.kron(S2, S2), paley(20)) / math.sqrt(80)
    assert torch.equal(hadamard(80, dtype=torch.float64), expected)
