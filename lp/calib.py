"""One calibration pass -> every statistic the similarity pruners and LinearPatch need.

Conventions (see `lp.models`): L dense layers; h_l = residual stream entering layer l
(l = 0..L-1), h_L = output of the last layer *before* the final norm; all seen in the engine's
layer-sequential pass (`lp.replay.Replay.walk`). A calibration batch is `[B, T]` token windows; statistics are
accumulated in float32 per batch (float64 running sums), streaming: only the current batch's
activations are held, never the whole calibration set.

What one pass over W windows of T tokens collects (indices a, b in 0..L):
  * `cos_token[a, b]`  = mean over all W*T tokens of cos(h_a[t], h_b[t]) (cosine over the hidden dim);
  * `cos_last[a, b]`   = the same on the last token of each window only (mean over windows);
  * `ang_last[a, b]`   = mean over windows of (1/pi) * arccos cos(h_a[T-1], h_b[T-1]) (Gromov et al.);
  * `cos_channel[a, b]`= reference LinearPatch code: per window, cosine over the *token* axis for each
    channel, averaged over channels, then over windows;
  * `abs_mean[w, l]`   = per channel mean over window w's tokens of |h_l|            -> [W, L+1, D];
  * `abs_mean_rot[w, l]` = the same for |h_l H| (H: the run's orthonormal basis, row vectors; computed in the
    model's dtype for half-precision models, see `lp.hadamard.Rotation.apply`) -> [W, L+1, D].
From these, the block score of any cut and the LinearPatch scales of any cut (a, b) and patch kind
follow without another forward pass: `s_c = mean_w abs_mean[w, b, c] / abs_mean[w, a, c]`.

The pairwise cosines use one Gram matrix per batch: each layer's activations are normalised
(per token, resp. per channel over tokens) and flattened, `X [L+1, B*T*D]`, and `X X^T` sums
the dot products of every pair at once. The rotation H is the run's basis (`patch.hadamard`, see
`lp.hadamard`), applied by `lp.hadamard.Rotation` (Kronecker form where H has one).

`get_stats(ctx)` caches the result on disk under `<lp cache>/calib/<sha of the key>/`
(safetensors + json) and in the run's `Calibration` (`ctx.calibration`, the one owner of the windows,
the statistics and their provenance), so selection and patch scales share one pass.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lp import cache
from lp import hadamard as hd
from lp.devices import input_device, model_dtype
from lp.models import Decoder
from lp.progress import bar
from lp.replay import Replay

log = logging.getLogger(__name__)

STATS_VERSION = 2  # 2: similarity matrices mirrored from the upper triangle (symmetric on any CPU); bump when the meaning of a stored statistic changes (invalidates the disk cache)
VARIANTS = ("paper", "reference")
SCALE_KINDS = ("diag", "rotate")


# --------------------------------------------------------------------------- statistics
@dataclass
class CalibStats:
    """Statistics of one calibration pass (see module docstring). Float64 [L+1, L+1] similarity
    matrices (symmetric, diagonal 1), float32 [W, L+1, D] abs-means; `abs_mean_rot` is None when
    the hidden size has no Hadamard matrix and no fallback seed was given."""

    cos_token: torch.Tensor
    cos_last: torch.Tensor
    ang_last: torch.Tensor
    cos_channel: torch.Tensor
    abs_mean: torch.Tensor
    abs_mean_rot: torch.Tensor | None
    meta: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)  # how this object was obtained (not saved)

    TENSORS = ("cos_token", "cos_last", "ang_last", "cos_channel", "abs_mean", "abs_mean_rot")

    @property
    def num_layers(self) -> int:
        return self.cos_token.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.abs_mean.shape[-1]

    def cos(self, a: int, b: int, kind: str = "token") -> float:
        """Mean cosine between h_a and h_b: kind "token" (all tokens), "last" (last token),
        "channel" (reference: over tokens per channel)."""
        mats = {"token": self.cos_token, "last": self.cos_last, "channel": self.cos_channel}
        if kind not in mats:
            raise ValueError(f"cos kind={kind!r}; choose one of {list(mats)}")
        return float(mats[kind][a, b])

    def block_scores(self, n: int, variant: str = "paper") -> torch.Tensor:
        """Score of removing [i, i+n) for each start i = 0..L-n: float64 [L-n+1].

        "paper": mean over tokens of cos(h_i, h_{i+n}) (cosine over hidden), every start allowed;
        "reference": mean over windows/channels of the cosine over tokens, only starts 1..L-n-1
        (other entries NaN), as the reference code scores them. Higher = more removable.
        """
        L = self.num_layers
        check_block(f"block_scores(variant={variant!r})", n, L, variant)
        starts = torch.arange(L - n + 1)
        if variant == "paper":
            return self.cos_token[starts, starts + n].clone()
        out = self.cos_channel[starts, starts + n].clone()
        out[0] = out[-1] = float("nan")
        return out

    def angular_scores(self, n: int) -> torch.Tensor:
        """Mean over windows of the last-token angular distance (1/pi) arccos cos(h_j, h_{j+n}),
        per start j = 0..L-n: float64 [L-n+1]. Lower = more removable."""
        check_block("angular_scores", n, self.num_layers, "paper")
        starts = torch.arange(self.num_layers - n + 1)
        return self.ang_last[starts, starts + n].clone()

    def scales(self, a: int, b: int, kind: str = "rotate") -> torch.Tensor:
        """LinearPatch scales s [D] float32 for the cut removing [a, b):
        s_c = mean over windows w of mean_t |(h_b R)_c| / mean_t |(h_a R)_c|, R = H ("rotate") or I ("diag").
        A channel with zero mean magnitude at h_a in some window contributes 1 for that window."""
        L = self.num_layers
        if not 0 <= a < b <= L:
            raise ValueError(f"cut [{a}, {b}) is not a valid block of layers 0..{L - 1}")
        if kind not in SCALE_KINDS:
            raise ValueError(f"scale kind={kind!r}; choose one of {list(SCALE_KINDS)}")
        src = self.abs_mean if kind == "diag" else self.abs_mean_rot
        if src is None:
            raise ValueError(f"no rotation basis for hidden size {self.hidden_size} (meta rotation="
                             f"{self.meta.get('rotation')!r}) and no patch.hadamard_fallback_seed: "
                             "rotated scales are unavailable")
        num, den = src[:, b].double(), src[:, a].double()
        ratio = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
        return ratio.mean(0).float()

    # ---- persistence
    def save(self, path) -> None:
        """Write `stats.safetensors` + `meta.json` into folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in self.TENSORS if getattr(self, k) is not None}
        save_file(tensors, str(path / "stats.safetensors"))
        (path / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True, default=str))

    @classmethod
    def load(cls, path) -> CalibStats:
        path = Path(path)
        t = load_file(str(path / "stats.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != STATS_VERSION:
            raise ValueError(f"calibration statistics in {path} have version {meta.get('version')}, "
                             f"expected {STATS_VERSION}")
        return cls(**{k: t.get(k) for k in cls.TENSORS}, meta=meta)


def check_block(method: str, n, num_layers: int, variant: str = "paper") -> None:
    """Validate a block size n for a model of `num_layers` layers. "paper": starts 0..L-n (n <= L-1,
    one layer must stay); "reference": starts 1..L-n-1 (first and last layer kept, n <= L-2)."""
    if variant not in VARIANTS:
        raise ValueError(f"{method}: variant={variant!r}; choose one of {list(VARIANTS)}")
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{method}: n={n!r} must be an integer number of layers to remove")
    hi = num_layers - 1 if variant == "paper" else num_layers - 2
    if n <= 0 or n > hi:
        rng = "0..L-n (at least one layer kept)" if variant == "paper" else \
            "1..L-n-1 (the first and last layers are never removed)"
        raise ValueError(f"{method}: n={n} is out of range for a model of L={num_layers} layers: "
                         f"block starts range over {rng}, so 1 <= n <= {hi}")


# --------------------------------------------------------------------------- the pass
@torch.inference_mode()
def collect(model, windows: torch.Tensor, batch_size: int = 1, rotation: hd.Rotation | None = None,
            progress: bool = False) -> CalibStats:
    """Run the dense `model` once over `windows` [W, T] (int64) and return its `CalibStats`.

    A visitor of the engine's layer-sequential pass (`lp.replay.Replay.walk`, one batch per chunk):
    it sees h_0..h_L of each batch (h_L = the last layer's output; the final norm and lm_head never
    run). Per batch, the whole stack of normalised activations [L+1, B, T, D] float32 is held twice
    (token- and channel-normalised) on the device the layers run on; nothing is kept across batches
    except the running sums and the per-window abs-means [W, L+1, D], kept on the input device and copied to
    host memory once at the end (no host synchronisation per layer).
    """
    dec = Decoder(model)
    L, D = dec.num_layers, dec.hidden_size
    W, T = windows.shape
    if W == 0 or T < 2:
        raise ValueError(f"calibration needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    engine = Replay(model, windows, batch_size)
    device = input_device(model)  # where the sums are reduced
    f64 = dict(dtype=torch.float64, device=device)
    g_tok, g_last, g_ang, g_ch = (torch.zeros(L + 1, L + 1, **f64) for _ in range(4))
    abs_mean = torch.zeros(W, L + 1, D, device=device)  # on the device: no host sync per layer and batch
    abs_rot = torch.zeros(W, L + 1, D, device=device) if rotation is not None else None
    state: dict = {}
    steps = bar(range(len(engine.batches)), progress, "calibration statistics", unit="batch")
    ticks = iter(steps)

    def visit(idx, rows, h_model):
        h_model = h_model.to(device)
        h = h_model.float()  # [B, T, D]
        B = h.shape[0]
        if state.get("B") != B:  # (re)allocate the per-batch buffers
            state.update(B=B, ones=torch.ones(B, 1, T, device=device), tok=torch.empty(L + 1, B, T, D, device=device),
                         ch=torch.empty(L + 1, B, T, D, device=device))
        ones = state["ones"]  # [B, 1, T]: sums over tokens as a matmul (~2.5x faster than a strided reduction)
        abs_mean[rows, idx] = torch.bmm(ones, h.abs())[:, 0] / T  # mean_t |h|
        if abs_rot is not None:  # in the model's dtype where it is half precision (see Rotation.apply)
            abs_rot[rows, idx] = torch.bmm(ones, rotation.apply(h_model).abs_())[:, 0] / T
        tok, ch = state["tok"], state["ch"]
        torch.div(h, torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-12), out=tok[idx])
        torch.div(h, torch.bmm(ones, h * h).sqrt_().clamp_min_(1e-12), out=ch[idx])
        if idx == L:  # the batch's whole stack is in: its pairwise sums
            g_tok.add_(_gram(tok.view(L + 1, -1)))
            g_ch.add_(_gram(ch.view(L + 1, -1)))
            last = tok[:, :, -1]  # [L+1, B, D]
            c = torch.einsum("abd,cbd->bac", last, last).double().clamp(-1, 1)  # per window [B, L+1, L+1]
            g_last.add_(c.sum(0))
            g_ang.add_((torch.arccos(c) / math.pi).sum(0))
            next(ticks, None)

    t0 = time.perf_counter()
    engine.walk(L, visit)
    next(ticks, None)  # closes the bar
    seconds = time.perf_counter() - t0
    return CalibStats(
        cos_token=_unit_diag(_symmetric(g_tok.cpu() / (W * T))), cos_last=_unit_diag(_symmetric(g_last.cpu() / W)),
        ang_last=_zero_diag(_symmetric(g_ang.cpu() / W)), cos_channel=_unit_diag(_symmetric(g_ch.cpu() / (W * D))),
        abs_mean=abs_mean.cpu(), abs_mean_rot=abs_rot.cpu() if abs_rot is not None else None,
        meta={"version": STATS_VERSION, "num_layers": L, "hidden_size": D, "windows": W, "seqlen": T,
              "batch_size": batch_size, "rotation": rotation.spec if rotation else None,
              "compute_seconds": round(seconds, 3), "device": str(device),
              "dtype": str(model_dtype(model)).removeprefix("torch.")},
    )


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x [K, N] float32 -> x x^T [K, K] float64 (matmul in float32)."""
    return (x @ x.T).double()


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle of `m` [K, K] mirrored onto the lower one: symmetric bit for bit by construction.
    A Gram product x x^T is symmetric only up to the BLAS kernel's summation order, which differs
    between CPUs (an AMD Zen 4 gave cos(a, b) != cos(b, a) in the last bits)."""
    upper = torch.triu(m)
    return upper + torch.triu(m, 1).T


def _unit_diag(m):
    return m.fill_diagonal_(1.0)  # exact 1 (rounding of sum of squares of normalised vectors)


def _zero_diag(m):
    return m.fill_diagonal_(0.0)


# --------------------------------------------------------------------------- the run's calibration
class Calibration:
    """The run's calibration data in one owner: the windows, the `CalibStats` computed from them and
    where they came from.

    `build()` returns `(windows [N, T] int64, provenance)` and runs at most once, on the first read of
    `windows` or `windows_provenance` (`built` says whether it ran). `stats(spec, fetch)` returns the
    statistics rotated by basis `spec`, memoised: `fetch()` runs at most once per spec. A disk-cache
    entry that serves the run instead of a pass over the windows (statistics here, pruner scores in
    `lp.pruners.base.ScoreCache`) hands the provenance recorded with it to `served_from_cache`.
    `provenance`: the windows' own once built, else the latest provenance served from a cache, else None.
    """

    def __init__(self, build: Callable[[], tuple[torch.Tensor, dict]]):
        self._build = build
        self._built: tuple[torch.Tensor, dict] | None = None
        self._served: dict | None = None
        self._stats: dict[str | None, CalibStats] = {}

    @property
    def built(self) -> bool:
        return self._built is not None

    def _data(self) -> tuple[torch.Tensor, dict]:
        if self._built is None:
            self._built = self._build()
        return self._built

    @property
    def windows(self) -> torch.Tensor:
        return self._data()[0]

    @property
    def windows_provenance(self) -> dict:
        return self._data()[1]

    @property
    def provenance(self) -> dict | None:
        """Where this run's calibration windows came from: built now, or recorded with a cache entry."""
        return self.windows_provenance if self.built else self._served

    def served_from_cache(self, provenance: dict | None) -> None:
        """A disk-cache entry stood in for the windows; `provenance` is what it recorded of them."""
        self._served = provenance

    def stats(self, spec: str | None, fetch: Callable[[], CalibStats]) -> CalibStats:
        """The statistics rotated by `spec` (`lp.hadamard.spec`): memoised, else `fetch()` (`get_stats`),
        whose `cost["cached"]` says a disk-cache entry served them."""
        if spec not in self._stats:
            stats = fetch()
            if stats.cost.get("cached"):
                self.served_from_cache(stats.meta.get("calibration"))
            self._stats[spec] = stats
        return self._stats[spec]

    def obtained(self) -> list[CalibStats]:
        """The statistics `stats` returned so far, first obtained first."""
        return list(self._stats.values())


# --------------------------------------------------------------------------- caching
def get_stats(ctx, fallback_seed: int | None = None, progress: bool | None = None) -> CalibStats:
    """The `CalibStats` of the dense model in `ctx` on `ctx.windows`, computed at most once.

    Looked up, in order, in the run's `ctx.calibration` (the same object for every caller of one run),
    then in the cache entry `<lp cache>/calib/<digest of key>/` (`lp.cache`), with key = `ctx.cache_key` +
    statistics version + rotation basis; otherwise computed in one pass and stored there. An empty
    `ctx.cache_key` disables the disk cache. The rotated abs-means use the basis `ctx.basis`
    (`lp.hadamard.Basis`), with `fallback_seed` (default `ctx.basis.fallback_seed`) naming the seeded random
    orthogonal matrix where that basis has no matrix for the hidden size; with neither, `abs_mean_rot` is None.
    `stats.cost` = {"seconds", "cached", "path"}.
    """
    basis = ctx.basis if fallback_seed is None else ctx.basis._replace(fallback_seed=fallback_seed)
    progress = ctx.progress if progress is None else progress  # a bar over the calibration batches
    D = Decoder(ctx.model).hidden_size
    spec = basis.spec(D)
    return ctx.calibration.stats(spec, lambda: _fetch(ctx, basis, spec, D, progress))


def _fetch(ctx, basis: hd.Basis, spec: str | None, D: int, progress: bool) -> CalibStats:
    """The statistics from the disk cache, else computed (and stored), with their `cost`."""
    t0 = time.perf_counter()

    def compute() -> CalibStats:
        rotation = hd.Rotation(D, basis.kind, basis.seed, basis.fallback_seed) if spec is not None else None
        stats = collect(ctx.model, ctx.windows, ctx.batch_size, rotation, progress)
        stats.meta["calibration"] = ctx.calibration.windows_provenance
        stats.meta["key"] = ctx.cache_key
        return stats

    if ctx.cache_key:
        key = {"ctx": ctx.cache_key, "version": STATS_VERSION, "rotation": spec}
        got = cache.fetch("calib", key, build=lambda tmp: compute().save(tmp), load=CalibStats.load)
        stats, hit, path = got.value, got.hit, str(got.path) if got.cached else None
    else:
        stats, hit, path = compute(), False, None
    stats.cost = {"seconds": round(time.perf_counter() - t0, 3), "cached": hit, "path": path}
    if hit:
        log.info("calibration statistics loaded from %s in %.2fs", path, stats.cost["seconds"])
    else:
        log.info("calibration statistics computed in %.2fs (%d windows x %d tokens)%s", stats.cost["seconds"],
                 *ctx.windows.shape, f", saved to {path}" if path else "")
    return stats


def similarity(ctx) -> list[list[float]] | None:
    """`cos_token` ([L+1, L+1], 4 decimals) of the first statistics this run's pruner or patch computed or
    loaded through `get_stats(ctx)`, for the report's similarity heatmap; None if none were."""
    stats = next(iter(ctx.calibration.obtained()), None)
    return None if stats is None else [[round(float(v), 4) for v in row] for row in stats.cos_token.tolist()]
