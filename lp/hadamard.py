"""Orthonormal bases for the LinearPatch rotation, and `Rotation` (x -> x H, fast).

Row vectors throughout: the rotation maps x [..., D] to x H, H orthonormal (H H^T = I).
`patch.hadamard` (one of `BASES`, `DEFAULT_BASIS` where a config leaves it out) picks H, read with its
seeds by `Basis.of(patch_cfg)`; `basis(dim, kind, seed)` returns H, `spec(...)` names it (the name goes into
calibration cache keys and result.json):

* ``constructed`` (lp's own): ``D = 2^k · m``, ``H = (S_{2^k} ⊗ B_m) / sqrt(D)`` where ``S`` is
  the Sylvester matrix (``S_1 = [1]``, ``S_{2n} = [[S_n, S_n], [S_n, -S_n]]``) and ``B_m`` an
  unnormalised ±1 base matrix of order ``m`` (``B_1 = [1]``, otherwise Paley):
  ``H[i*m + a, j*m + b] = S[i, j] · B[a, b] / sqrt(D)``. Base orders come from primes ``q`` only:
  Paley I (``q ≡ 3 mod 4``): order ``q + 1``; Paley II (``q ≡ 1 mod 4``): order ``2(q + 1)``;
  Paley I is preferred when both give the same order. ``factorize(D)`` picks the largest ``2^k``
  whose cofactor is a base order. ``H`` is not symmetric in general: never assume ``H == H.T``.
* ``official``: the matrix of the official LinearPatch code, QuaRot's ``matmul_hadU`` applied to
  the identity. ``get_hadK`` takes the first ``K`` of `OFFICIAL_ORDERS` dividing ``D`` (``D / K``
  must then be a power of two, else the size is unsupported; ``K = 1`` for a power of two);
  ``matmul_hadU`` maps each row x to ``(T_K ⊗ S_{D/K}) x / sqrt(D)`` (``T_K`` the hard-coded ±1
  table of order K, `lp/hadamard_tables.txt`), so on the identity it returns
  ``H = (T_K^T ⊗ S_{D/K}) / sqrt(D)``, with ``sqrt(D)`` the float32 ``torch.tensor(D).sqrt()``.
  In float32 / float64 it equals ``matmul_hadU(torch.eye(D, dtype=...))`` bit for bit.
  (Assumption, stated: the official `get_hadamard_matrix(D)` is that matrix, as in SpinQuant's
  ``hadamard_matrix``; its file is not in the public index.)
* ``random``: a seeded Haar-random orthogonal matrix (QR of a float64 Gaussian from
  ``torch.Generator().manual_seed(seed)``, columns' signs fixed so ``diag(R) > 0``).
* ``random_hadamard``: QuaRot's randomized Hadamard ``diag(z) H_official``, ``z`` seeded ±1.

A hidden size with no construction for the chosen kind raises a ValueError naming the supported
sizes, unless ``fallback_seed`` is given: then the seeded random orthogonal matrix
(``random_orthogonal:<seed>``, entries *not* ±1/sqrt(D)) stands in.
Sign patterns are built exactly (int8, cached per D); ``hadamard(D)`` (constructed) returns
``signs.to(dtype) * round_to_dtype(1/sqrt(D))``, bit-identical to building in float64 and casting.
Every call returns a fresh tensor.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["BASES", "DEFAULT_BASIS", "OFFICIAL_ORDERS", "Basis", "Rotation", "base_orders", "basis", "factorize",
           "hadamard", "official_factorize", "official_table", "paley", "spec", "supported"]

_SHOWN_BASE_LIMIT = 256  # base orders listed in error messages
BASES = ("constructed", "official", "random", "random_hadamard")
DEFAULT_BASIS = "constructed"  # the basis where none is named (the user-facing default: conf/patch/_basis.yaml)
OFFICIAL_ORDERS = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)  # the order get_hadK tries them
_TABLES = Path(__file__).with_name("hadamard_tables.txt")
_MAX_FACTOR = 64  # largest Sylvester factor applied as one matmul by `Rotation`


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
    """Cached ±1 sign pattern (int8, CPU) of the constructed Hadamard matrix of order ``dim``."""
    p, m = factorize(dim)
    return torch.kron(_sylvester(p), paley(m).to(torch.int8))  # exact: entries are ±1


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


# --------------------------------------------------------------------------- official (QuaRot tables)
def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=1)
def _official_tables() -> dict[int, torch.Tensor]:
    """`lp/hadamard_tables.txt` -> {K: ±1 int8 [K, K]} (format in the file's header)."""
    tables, rows, order = {}, [], None
    for line in _TABLES.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("K "):
            order, rows = int(line[2:]), []
            continue
        bits = bin(int(line, 16))[2:].zfill(order)
        rows.append([-1 if b == "1" else 1 for b in bits])
        if len(rows) == order:
            tables[order] = torch.tensor(rows, dtype=torch.int8)
    return tables


def official_table(order: int) -> torch.Tensor:
    """The unnormalised ±1 table ``T_K`` of order K (float64), as QuaRot's ``get_had<K>()``."""
    tables = _official_tables()
    if order not in tables:
        raise ValueError(f"no official Hadamard table of order {order}; tables: {sorted(tables)}")
    return tables[order].double()


def official_factorize(dim: int) -> tuple[int, int] | None:
    """``(K, D / K)`` as the official ``get_hadK`` picks them (K = 1 for a power of two), or None
    where it fails (its assertion: the first K of `OFFICIAL_ORDERS` dividing D leaves no power of two)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return None
    for k in OFFICIAL_ORDERS:
        if dim % k == 0:
            return (k, dim // k) if _is_pow2(dim // k) else None
    return (1, dim) if _is_pow2(dim) else None


def _sylvester(n: int) -> torch.Tensor:
    s = torch.ones(1, 1, dtype=torch.int8)
    while s.shape[0] < n:
        s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
    return s


@functools.lru_cache(maxsize=16)
def _official_signs(dim: int) -> torch.Tensor:
    k, p = official_factorize(dim)
    t = _official_tables()[k].T.contiguous() if k > 1 else torch.ones(1, 1, dtype=torch.int8)
    return torch.kron(t, _sylvester(p))  # exact: int8 ±1


def _official(dim: int, dtype: torch.dtype) -> torch.Tensor:
    """matmul_hadU(eye(D)): ±1 / sqrt(D), divided in `dtype` by the float32 ``sqrt(D)`` (float32 and
    float64 as the official code computes them; other dtypes: the float32 matrix cast)."""
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return (_official_signs(dim).to(work) / torch.tensor(dim).sqrt()).to(dtype)


# --------------------------------------------------------------------------- bases
def _check(kind: str, seed) -> None:
    if kind not in BASES:
        raise ValueError(f"patch.hadamard={kind!r}; choose one of {list(BASES)}")
    random = kind.startswith("random")
    if random and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"patch.hadamard={kind} needs an integer patch.hadamard_seed, got {seed!r}")
    if not random and seed is not None:
        raise ValueError(f"patch.hadamard_seed={seed!r} is only used by the random bases "
                         f"(random, random_hadamard), not by patch.hadamard={kind}; set it to null")


class Basis(NamedTuple):
    """The run's choice of basis: `kind` (one of `BASES`), `seed` (random bases only) and
    `fallback_seed` (the seeded random orthogonal matrix standing in where `kind` has no matrix for
    the hidden size; None: no stand-in)."""

    kind: str = DEFAULT_BASIS
    seed: int | None = None
    fallback_seed: int | None = None

    @classmethod
    def of(cls, patch_cfg) -> Basis:
        """`patch.hadamard` / `patch.hadamard_seed` / `patch.hadamard_fallback_seed` of a `patch` config
        (the only reader of these keys; a key the config leaves out takes the default above)."""
        return cls(patch_cfg.get("hadamard", DEFAULT_BASIS), patch_cfg.get("hadamard_seed"),
                   patch_cfg.get("hadamard_fallback_seed"))

    def spec(self, dim: int) -> str | None:
        """`spec(dim, kind, seed, fallback_seed)`: the name of this basis at hidden size `dim`, or None."""
        return spec(dim, self.kind, self.seed, self.fallback_seed)


def spec(dim: int, kind: str = DEFAULT_BASIS, seed: int | None = None,
         fallback_seed: int | None = None) -> str | None:
    """Name of the basis `basis` returns: "constructed", "official", "random:<seed>",
    "random_hadamard:<seed>", "random_orthogonal:<fallback_seed>"; None if there is none."""
    _check(kind, seed)
    if kind == "random":
        return f"random:{seed}"
    exists = supported(dim) if kind == "constructed" else official_factorize(dim) is not None
    if exists:
        return kind if kind != "random_hadamard" else f"random_hadamard:{seed}"
    return None if fallback_seed is None else f"random_orthogonal:{int(fallback_seed)}"


def unsupported(dim: int, kind: str) -> ValueError:
    if kind == "constructed":
        try:
            hadamard(dim)
        except ValueError as e:
            return e
    return ValueError(
        f"No official (QuaRot-table) Hadamard matrix for D = {dim} (patch.hadamard={kind}): get_hadK takes "
        f"the first K of {list(OFFICIAL_ORDERS)} dividing D and needs D / K to be a power of two (or D a "
        f"power of two). Use patch.hadamard=constructed or random, or pass fallback_seed=<int>.")


def _random_signs(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(torch.float64)


def basis(dim: int, kind: str = DEFAULT_BASIS, seed: int | None = None, *, fallback_seed: int | None = None,
          dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The orthonormal D×D matrix H of basis `kind` (module docstring), row-vector convention x -> x H."""
    name = spec(dim, kind, seed, fallback_seed)
    if name is None:
        raise unsupported(dim, kind)
    if kind == "random" or name.startswith("random_orthogonal:"):
        q = _random_orthogonal(dim, seed if kind == "random" else int(fallback_seed))
        return q.to(device=device, dtype=dtype, copy=True)
    if kind == "constructed":
        return hadamard(dim, dtype=dtype, device=device)
    if kind == "official":
        return _official(dim, dtype).to(device)
    return (_official(dim, torch.float64) * _random_signs(dim, seed)[:, None]).to(device=device, dtype=dtype)


class Rotation:
    """x -> x H for ``H = basis(dim, kind, seed, fallback_seed=...)``, float32 in and out.

    Kronecker-structured bases (constructed, official, random_hadamard) are applied factor by
    factor on x reshaped to [..., d1, d2, ...] (Sylvester parts split into factors <= 64):
    cost D * (d1 + d2 + ...) per row instead of D^2. Random orthogonal bases multiply densely.
    """

    def __init__(self, dim: int, kind: str = DEFAULT_BASIS, seed: int | None = None,
                 fallback_seed: int | None = None):
        self.dim, self.kind, self.seed, self.fallback_seed = dim, kind, seed, fallback_seed
        self.spec = spec(dim, kind, seed, fallback_seed)
        if self.spec is None:
            raise unsupported(dim, kind)
        self.signs = _random_signs(dim, seed).float() if kind == "random_hadamard" else None
        self.factors = None  # Kronecker factors, outermost first (float64 ±1)
        if kind == "constructed" and supported(dim):
            p, m = factorize(dim)
            self.factors = _split(p) + ([paley(m)] if m > 1 else [])
            self.scale = dim ** -0.5
        elif kind in ("official", "random_hadamard") and official_factorize(dim):
            k, p = official_factorize(dim)
            self.factors = ([official_table(k).T] if k > 1 else []) + _split(p)
            self.scale = float(1 / torch.tensor(dim).sqrt().double())
        self._cache: dict = {}

    def matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """The dense H [D, D] (the matrix `apply` multiplies by)."""
        return basis(self.dim, self.kind, self.seed, fallback_seed=self.fallback_seed, dtype=dtype, device=device)

    def _pm1(self, device, dtype) -> torch.Tensor:
        """The dense unnormalised ±1 matrix (row signs included), cached per device and dtype."""
        key = (str(device), dtype)
        if key not in self._cache:
            pm = functools.reduce(torch.kron, [f.contiguous() for f in self.factors] or [torch.ones(1, 1).double()])
            if self.signs is not None:
                pm = pm * self.signs.double()[:, None]
            self._cache[key] = pm.to(device=device, dtype=dtype)
        return self._cache[key]

    def _operands(self, device) -> list[torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            if self.factors is None:
                self._cache[key] = [self.matrix(torch.float32, device)]
            else:  # scale folded into the first factor; middle axes are left-multiplied by f^T
                fs = [f * self.scale if i == 0 else f for i, f in enumerate(self.factors or [torch.ones(1, 1)])]
                fs = [f if i == len(fs) - 1 else f.T for i, f in enumerate(fs)]
                self._cache[key] = [f.to(device=device, dtype=torch.float32).contiguous() for f in fs]
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> x H [..., D] float32.

        float32 x: exact float32 arithmetic (Kronecker factors, or the dense matrix). bf16 / fp16 x
        (a half-precision model's activations) with a ±1 basis: one dense matmul in x's dtype with the
        exact unnormalised ±1 matrix (AMX / tensor cores; D^2 per row but ~20x faster than float32
        here), so only the result is rounded to x's dtype (relative 2^-9 for bf16, unbiased), then
        scaled in float32. The official code rotates fp16 activations by an fp16 H.
        """
        if x.dtype in (torch.bfloat16, torch.float16) and self.factors is not None:
            return (x @ self._pm1(x.device, x.dtype)).float().mul_(self.scale)
        x = x.float()
        ops = self._operands(x.device)
        if self.signs is not None:
            x = x * self.signs.to(x.device)
        if self.factors is None:
            return x @ ops[0]
        shape, y, after = x.shape, x.reshape(-1, self.dim), self.dim
        for f in ops:
            size = f.shape[0]
            after //= size
            # axis of this factor: y[..., b, r] = sum_a y[..., a, r] F[a, b] (f = F^T except the last)
            y = y.reshape(-1, size) @ f if after == 1 else f @ y.reshape(-1, size, after)
        return y.reshape(shape)


def _split(p: int) -> list[torch.Tensor]:
    """Sylvester S_p as Kronecker factors S_{<=64} ⊗ ... (S_{2^a} ⊗ S_{2^b} = S_{2^(a+b)})."""
    out = []
    while p > 1:
        f = min(p, _MAX_FACTOR)
        out.append(_sylvester(f).double())
        p //= f
    return out
