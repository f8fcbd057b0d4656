"""The patches a run fits on the dense model, as candidates for verification, and the ones it ships.

`fit_candidates(ctx, removed, patch_cfg)` fits every kind the run builds (`lp.patch.kinds_to_fit`: the
configured kind or `patch=auto`'s candidates, then the `patch.verify` kinds) at every cut of `removed`
(`lp.patch.fit_patches`), beside "none" (no patch at any cut). `lp.verify.verify_patches` measures them
on held-out windows and, for `patch=auto`, chooses per cut; `ship(candidates, verification, warnings)`
returns the patches to insert and `result["patch"]`. `lp.run.make_patches` calls the three in this order,
before the drop. Patches are keyed by the first removed layer a of their run [a, b) (None = no patch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lp.models import Decoder
from lp.patch import LinearPatch, fit_patches, kinds_to_fit, own_kinds, patch_info, runs_of


@dataclass(frozen=True)
class Candidates:
    """What `fit_candidates` fitted at the cuts of `removed` for `patch.kind` = `kind`.

    `patches[k][a]` for every fitted kind k and for "none"; `own`: the kinds among them the run may
    ship (`lp.patch.own_kinds`: the configured kind, or auto's candidates that could be fitted here);
    `info`: `fit_patches`' cut records and costs (None when no kind needed fitting); `seconds`: fitting time.
    """

    kind: str
    removed: list[int]
    patches: dict[str, dict[int, LinearPatch | None]]
    own: list[str]
    info: dict | None = None
    seconds: float = 0.0


def fit_candidates(ctx, removed, patch_cfg) -> Candidates:
    """Fit the run's candidate patches on the dense model in `ctx` (a `PruneContext`)."""
    t0 = time.perf_counter()
    runs = runs_of(removed)
    kinds = kinds_to_fit(patch_cfg, Decoder(ctx.model).hidden_size, ctx.model, runs)
    fitted, info = fit_patches(ctx, removed, patch_cfg, kinds) if kinds else ({}, None)
    seconds = time.perf_counter() - t0
    fitted["none"] = {a: None for a, _ in runs}
    own = [k for k in own_kinds(patch_cfg) if k in fitted]  # foldable / bridgeable candidates only
    return Candidates(patch_cfg.kind, sorted(int(i) for i in removed), fitted, own, info, seconds)


def ship(cands: Candidates, verification: dict | None, warnings: list[str]) -> tuple[dict[int, LinearPatch], dict]:
    """`(patches to insert {a: LinearPatch}, result["patch"])`: the configured kind's patches, or for
    `patch=auto` the kind `verification["choice"]` names at each cut; cuts without a patch are left out.
    `result["patch"]` carries the `verification` record (None: not verified) and its `warnings`."""
    kind = cands.kind
    if kind == "auto":
        chosen = {c["start"]: cands.patches[c["kind"]][c["start"]] for c in verification["choice"]}
    else:
        chosen = cands.patches[kind]
    chosen = {a: p for a, p in chosen.items() if p is not None}
    fit_info = cands.info
    if fit_info is None:
        info = {"kind": kind, "num_patches": 0, "params": 0}
    else:
        cuts = [next(c for c in fit_info["cuts"][p.kind] if c["start"] == a) for a, p in sorted(chosen.items())]
        info = patch_info(kind, chosen, cuts, fit_info)
    info["verification"] = verification
    info["warnings"] = warnings
    return chosen, info
