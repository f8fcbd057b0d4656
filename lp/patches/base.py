"""What every patch kind implements, and the data it fits on.

`PatchKind.fit(source, a, b)` returns a `Fit` for the cut removing dense layers [a, b): the D x D
matrix W (float64; the patch computes x -> x W on row vectors x = the pruned stream h_a) or None
for "no patch". Kinds read either the shared calibration statistics (`source.stats`, one pass,
cached on disk: diag / rotate / scalar) or streaming sums over the calibration activations at the
cut (`PatchKind.accumulator`, filled by one extra pass `collect_cuts` of the engine that stops at
the deepest b needed: lstsq / rotate_outlier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lp import hadamard as hd
from lp.models import Decoder
from lp.replay import Replay


@dataclass
class Fit:
    """A fitted patch: `weight` [D, D] float64 (None = no patch), `scales` [D] (or None) the
    per-channel / per-direction scales it was built from, `info` small numbers for result.json."""

    weight: torch.Tensor | None
    scales: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


class PatchKind:
    """One way of bridging a cut. Subclasses set `name`, `paper` (citation + formula, shown in
    docs) and override `fit`; `uses_rotation` kinds need the Hadamard basis of the hidden size.

    `site`: where the patch's x -> x W acts. "input" (default): on the stream entering the first
    kept module after the cut (`lp.patch.Patched`). "mlp": on the MLP output of the last kept layer
    *before* the cut (`lp.patch.OutputPatched`), which folds exactly into that layer's `down_proj`.
    `foldable`: a saved model with this kind is always a plain checkpoint of the base architecture
    (`patch.foldable=true` allows only such kinds)."""

    name = ""
    paper = ""
    uses_rotation = False
    site = "input"
    foldable = False

    def check(self, patch_cfg, hidden_size: int) -> None:
        """Validate this kind's settings before any weights load (raise ValueError naming the key)."""

    def check_cuts(self, model, runs: list[tuple[int, int]]) -> None:
        """Raise ValueError when this kind cannot bridge one of the cuts `runs` of the dense `model`
        (e.g. an "mlp"-site kind at a cut with no kept layer before it); called before any fitting."""

    def accumulator(self, source: FitSource, a: int, b: int):
        """None, or an object with `update(xa, xb)` (float32 [B, T, D] each: h_a, h_b of one
        calibration batch of the dense model) that `fit` then reads as `source.accumulated(self, a, b)`.
        It may also have `attach(model) -> list of hook handles` to see other activations of the
        same forward (hooks removed after the pass)."""
        return None

    def fit(self, source: FitSource, a: int, b: int) -> Fit:
        raise NotImplementedError


class FitSource:
    """Calibration data of the dense model in `ctx` (a `PruneContext`) for fitting patches.

    `stats`: the shared `CalibStats` (computed at most once per run and cached on disk);
    `rotation()`: the Hadamard basis H [D, D] float64 (rows = the basis vectors, x -> x H);
    `accumulated(kind, a, b)`: the kind's accumulator after `collect(kinds, cuts)` ran.
    """

    def __init__(self, ctx, patch_cfg):
        self.ctx, self.cfg = ctx, patch_cfg
        dec = Decoder(ctx.model)
        self.num_layers, self.hidden_size = dec.num_layers, dec.hidden_size
        self.basis = hd.Basis.of(patch_cfg)
        self._stats = None
        self._rotation = None
        self._acc: dict = {}
        self.collect_seconds = 0.0

    @property
    def stats(self):
        if self._stats is None:
            from lp.calib import get_stats  # noqa: PLC0415

            self._stats = get_stats(self.ctx, fallback_seed=self.basis.fallback_seed)
        return self._stats

    def rotation(self) -> torch.Tensor:
        """H of `patch.hadamard` / `patch.hadamard_seed` (`lp.hadamard.basis`), float64."""
        if self._rotation is None:
            self._rotation = hd.basis(self.hidden_size, self.basis.kind, self.basis.seed,
                                      fallback_seed=self.basis.fallback_seed)
        return self._rotation

    def rotation_spec(self) -> str | None:
        return self.basis.spec(self.hidden_size)

    def rotated_stats(self):
        """`stats`, checked to be rotated in the patch's basis (the scales must be measured in H)."""
        spec = self.rotation_spec()
        if self.stats.meta.get("rotation") != spec:
            raise ValueError(f"calibration statistics were rotated by {self.stats.meta.get('rotation')!r} but the "
                             f"patch uses basis {spec!r}: build the PruneContext with the patch's basis")
        return self.stats

    def collect(self, kinds, cuts) -> None:
        """One pass over the calibration windows filling the accumulators of `kinds` at `cuts`."""
        import time  # noqa: PLC0415

        todo = {}
        for kind in kinds:
            for a, b in cuts:
                if (kind.name, a, b) not in self._acc and (acc := kind.accumulator(self, a, b)) is not None:
                    todo[(kind.name, a, b)] = acc
        if not todo:
            return
        t0 = time.perf_counter()
        collect_cuts(self.ctx.model, self.ctx.windows, self.ctx.batch_size,
                     {k: ((k[1], k[2]), acc) for k, acc in todo.items()})
        self.collect_seconds += time.perf_counter() - t0
        self._acc.update(todo)

    def accumulated(self, kind: PatchKind, a: int, b: int):
        if (kind.name, a, b) not in self._acc:
            self.collect([kind], [(a, b)])
        return self._acc[(kind.name, a, b)]


@torch.inference_mode()
def collect_cuts(model, windows: torch.Tensor, batch_size: int, jobs: dict) -> None:
    """Run the dense `model` over `windows` [N, T] in batches of `batch_size`; for every job
    `key -> ((a, b), acc)` call `acc.update(h_a, h_b)` per batch (float32 [B, T, D], on the device the
    layer before b ran on).

    A visitor of the engine's layer-sequential pass (`lp.replay.Replay.walk`) up to the deepest b
    needed, so later layers, the final norm and the head never run.
    """
    need = sorted({i for (cut, _acc) in jobs.values() for i in cut})
    got: dict[int, torch.Tensor] = {}

    def visit(idx, _rows, h):
        if idx in need:
            got[idx] = h.float()
        if idx == need[-1]:
            for (a, b), acc in jobs.values():
                acc.update(got[a].to(got[b].device), got[b])
            got.clear()

    handles = []  # accumulators that read more than the stream (the MLP output: lp.patches._mlp) hook in
    for _cut, acc in jobs.values():
        handles += acc.attach(model) if hasattr(acc, "attach") else []
    try:
        Replay(model, windows, batch_size).walk(need[-1], visit)
    finally:
        for h in handles:
            h.remove()
