"""Orthonormal Hadamard matrices for LinearPatch rotations.

Conventions
-----------
* ``hadamard(D)`` returns ``H`` with ``H @ H.T == I`` and every entry ``±1/sqrt(D)``.
  ``H`` is not symmetric in general (Paley I bases are not): never assume ``H == H.T``.
* ``D = 2^k · m``: ``H = (S_{2^k} ⊗ B_m) / sqrt(D)`` where ``S`` is the Sylvester
  matrix (``S_1 = [1]``, ``S_{2n} = [[S_n, S_n], [S_n, -S_n]]``) and ``B_m`` is an
  unnormalised ±1 base Hadamard matrix of order ``m`` (``B_1 = [1]``, otherwise Paley):
  ``H[i*m + a, j*m + b] = S[i, j] · B[a, b] / sqrt(D)``.
* Base orders come from primes ``q`` only:
  Paley I  (``q ≡ 3 mod 4``): order ``q + 1``;
  Paley II (``q ≡ 1 mod 4``): order ``2(q + 1)``.
  Paley I is preferred when both give the same order (e.g. 12 = 11+1 = 2·(5+1)).
* ``factorize(D)`` picks the largest ``2^k`` whose cofactor ``m`` is a base order.
* The base matrix is built in float64, the exact ±1 sign pattern is doubled and
  cached as int8 per ``D`` (CPU); the result is
  ``signs.to(dtype) * round_to_dtype(1/sqrt(D))``, bit-identical to building in
  float64 and casting. Every call returns a fresh tensor.
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard", "supported", "factorize", "base_orders", "paley"]

_SHOWN_BASE_LIMIT = 256  # base orders listed in error messages


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % p for p in range(2, math.isqrt(n) + 1))


def _paley_prime(m: int) -> tuple[int, int] | None:
    """Return ``(construction, q)`` building base order ``m`` (``m > 1``), or ``None``."""
    if m % 4:
        return None
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        return 1, q
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return 2, q
    return None


def _is_base(m: int) -> bool:
    return m == 1 or _paley_prime(m) is not None


def base_orders(limit: int = _SHOWN_BASE_LIMIT) -> list[int]:
    """Base orders ``m <= limit`` that ``factorize`` actually uses (not ``2^j ·`` a smaller one)."""
    return [m for m in range(1, limit + 1) if factorize(m) == (1, m)]


def factorize(dim: int) -> tuple[int, int] | None:
    """Return ``(2^k, m)`` with ``dim = 2^k · m``, ``m`` a base order, ``2^k`` maximal; else ``None``."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return None
    p = dim & -dim  # largest power of two dividing dim
    while p >= 1:
        if _is_base(dim // p):
            return p, dim // p
        p //= 2
    return None


def supported(dim: int) -> bool:
    """Whether ``hadamard(dim)`` can be built without a random fallback."""
    return factorize(dim) is not None


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` with χ the quadratic character mod prime ``q`` (float64)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[[(x * x) % q for x in range(1, q)]] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley(m: int) -> torch.Tensor:
    """Unnormalised ±1 base Hadamard matrix of order ``m`` (float64, ``B @ B.T == m I``)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    spec = _paley_prime(m)
    if spec is None:
        raise ValueError(f"{m} is not a supported base order")
    kind, q = spec
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[1:, 1:] = _jacobsthal(q)
    S[0, 1:] = 1.0
    if kind == 1:  # Q skew-symmetric: H = I + [[0, 1], [-1, Q]]
        S[1:, 0] = -1.0
        return torch.eye(q + 1, dtype=torch.float64) + S
    S[1:, 0] = 1.0  # Q symmetric: 0 -> [[1,-1],[-1,-1]], ±1 -> ±[[1,1],[1,-1]]
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    Bm = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(torch.eye(q + 1, dtype=torch.float64), A) + torch.kron(S, Bm)


@functools.lru_cache(maxsize=16)
def _signs(dim: int) -> torch.Tensor:
    """Cached ±1 sign pattern (int8, CPU) of the Hadamard matrix of order ``dim``."""
    _, m = factorize(dim)
    H = paley(m).to(torch.int8)  # exact: entries are ±1
    while H.shape[0] < dim:  # Sylvester doubling: S_{2n} ⊗ B = [[X, X], [X, -X]]
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=4)
def _random_orthogonal(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    d = torch.sign(torch.diagonal(R))
    return Q * torch.where(d == 0, torch.ones_like(d), d)  # sign fix -> unique QR


def hadamard(dim: int, *, dtype: torch.dtype = torch.float32, device=None,
             fallback_seed: int | None = None) -> torch.Tensor:
    """Orthonormal ``dim × dim`` Hadamard matrix (entries ``±1/sqrt(dim)``).

    If ``dim`` is not ``2^k · m`` for a base order ``m`` (see module docstring) a
    ``ValueError`` is raised, unless ``fallback_seed`` is given: then a seeded random
    orthogonal matrix (QR of a Gaussian, signs fixed so ``diag(R) > 0``) is returned.
    Its entries are *not* ``±1/sqrt(dim)``. ``fallback_seed`` is ignored for supported sizes.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"Hadamard dimension must be a positive int, got D = {dim!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    if supported(dim):
        scale = torch.tensor(dim ** -0.5, dtype=torch.float64).to(dtype)
        return _signs(dim).to(device=device, dtype=dtype) * scale.to(device)
    if fallback_seed is None:
        raise ValueError(
            f"No Hadamard matrix construction for D = {dim}. Supported sizes are "
            f"D = 2^k · m with m in {{{', '.join(map(str, base_orders()))}, ...}} "
            f"(m = q+1 for prime q ≡ 3 mod 4, or m = 2(q+1) for prime q ≡ 1 mod 4). "
            f"Pass fallback_seed=<int> to get a seeded random orthogonal matrix instead.")
    return _random_orthogonal(dim, int(fallback_seed)).to(device=device, dtype=dtype, copy=True)
