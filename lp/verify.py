"""Held-out verification: never ship a patch (or a selection) worse than the alternative unsaid.

Held-out windows = `calib.nval` windows of `calib.seqlen` tokens from the tail of the calibration
corpus that `calib.holdout` reserves (`lp.data.sample_windows`): never used to fit a patch
or score a layer. NLL = mean over held-out windows of the mean next-token NLL (nats).

`Heldout` replays the *dense* model on those windows with the one replay engine (`lp.replay`):
the stream entering the first layer a candidate removes is computed once (the latest prefix is
kept); each candidate (a set of removed layers, a patch or None per cut) then costs only the
layers after that point, the final norm and the LM head.

  * `verify_patches`: held-out NLL with no patch and with every fitted kind at every cut; for
    `patch=auto` the choice per cut (the best uniform kind, then one pass over the cuts trying
    each kind at that cut, the others fixed); a warning when the configured kind is worse than none.
  * `check_selection`: held-out NLL (unpatched) of the chosen layers and of the pruner's next
    candidates by its own score; `pruner.rerank=k` picks the best of the top k; a warning when a
    runner-up is much better.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from lp import data
from lp.models import Decoder
from lp.patch import LinearPatch, OutputPatched, fit_patches, kinds_to_fit, own_kinds, patch_info, runs_of
from lp.patches._mlp import site
from lp.pruners.base import Selection
from lp.replay import Replay, StreamCache

log = logging.getLogger(__name__)

PATCH_MARGIN = 0.01  # nats (~1% PPL): a patch worse than none by more than this is reported
RUNNER_UP_MARGIN = 0.05  # nats (~5% PPL): a runner-up selection better by more than this is reported
CHECK_ALTERNATIVES = 3  # next candidates by the pruner's own score whose held-out NLL is recorded


def heldout(cfg, model, tokenizer) -> Heldout | None:
    """The run's `Heldout` on `calib.nval` held-out windows (None when `calib.nval` is 0 or absent)."""
    if not cfg.calib.get("nval"):
        return None
    return Heldout(model, heldout_windows(cfg, tokenizer), cfg.calib.batch_size)


def heldout_windows(cfg, tokenizer) -> torch.Tensor:
    """`[calib.nval, calib.seqlen]` windows from the calibration corpus's held-out tail (the calibration
    sampler `lp.data.sample_windows`: the token stream's last `holdout`, or a document corpus's last rows)."""
    c = cfg.calib
    _, val, _ = data.sample_windows(tokenizer, c.corpus, c.split, c.nsamples, c.seqlen, c.seed, c.holdout,
                                    cfg.data.root, cfg.data.source, nval=c.nval)
    return val


class Heldout:
    """Held-out NLL of the dense `model` with layers removed and patches at the cuts.

    `windows` [N, T] token ids. `nll(removed, patches)`: `removed` dense indices, `patches`
    {run start a: LinearPatch or None}; the patch of run [a, b) multiplies the stream entering
    dense layer b (the final norm when b = L). The dense prefix before the first removed layer
    is cached per start (the latest two)."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 1):
        self.replay = Replay(model, windows, batch_size)
        self.num_layers = self.replay.num_layers
        self.num_windows = len(windows)
        self._streams: StreamCache | None = None  # h_0 and the latest stream walked to (budget 0, two buffers: h_{a-1} for mlp-site patches beside h_a)
        self.calls = 0

    def _stream(self, start: int) -> torch.Tensor:
        """The dense stream entering layer `start` [N, T, D] (a cached tensor: do not modify)."""
        if self._streams is None:
            # positions 0..L are the streams entering layers 0..L-1 and h_L (the last entry never runs)
            self._streams = StreamCache(self.replay, list(range(self.num_layers + 1)), 0, buffers=2)
        return self._streams.get(start)

    @torch.inference_mode()
    def nll(self, removed, patches: dict[int, LinearPatch | None] | None = None) -> float:
        removed = sorted(set(int(i) for i in removed))
        runs = [(a, b, (patches or {}).get(a)) for a, b in runs_of(removed)]
        ends = {b: p for a, b, p in runs if p is not None and p.site == "input"}
        mlps = {a - 1: p for a, b, p in runs if p is not None and p.site == "mlp"}  # patch on layer a-1's MLP output
        start = min([removed[0] if removed else self.num_layers, *mlps])
        x = self._stream(start).clone()
        for layer in range(start, self.num_layers):
            if layer in removed:
                continue
            if ends.get(layer) is not None:
                x = ends[layer](x)
            with mlp_patched(self.replay.layers[layer], mlps.get(layer)):
                self.replay.advance(x, layer, x)
        if ends.get(self.num_layers) is not None:
            x = ends[self.num_layers](x)
        self.calls += 1
        return self.replay.nll(x, []).mean().item()


@contextmanager
def mlp_patched(layer, patch: LinearPatch | None):
    """`layer` with `patch` on its MLP output (`lp.patch.OutputPatched`) inside the block (no-op for None)."""
    if patch is None:
        yield
        return
    parent, name = site(layer)
    inner = getattr(parent, name)
    setattr(parent, name, OutputPatched(inner, patch))
    try:
        yield
    finally:
        setattr(parent, name, inner)


# --------------------------------------------------------------------------- patches
def fit_and_verify(ctx, removed, patch_cfg, heldout: Heldout | None) -> tuple[dict, dict, list[str]]:
    """Fit the run's patches, verify them on `heldout` (None: verification off) and, for
    `patch=auto`, choose per cut. Returns `(patches to insert {a: LinearPatch}, result["patch"], warnings)`."""
    kind = patch_cfg.kind
    t0 = time.perf_counter()
    kinds = kinds_to_fit(patch_cfg, Decoder(ctx.model).hidden_size, ctx.model, runs_of(removed))
    fitted, fit_info = fit_patches(ctx, removed, patch_cfg, kinds) if kinds else ({}, None)
    fit_seconds = time.perf_counter() - t0
    runs = runs_of(removed)
    fitted["none"] = {a: None for a, _ in runs}
    record, warnings = None, []
    if heldout is not None:
        t1 = time.perf_counter()
        own = [k for k in own_kinds(patch_cfg) if k in fitted]  # foldable / bridgeable candidates only
        record, warnings = verify_patches(heldout, removed, fitted, kind, own)
        record["seconds"] = {"fit": round(fit_seconds, 3), "verify": round(time.perf_counter() - t1, 3)}
    if kind == "auto":
        chosen = {c["start"]: fitted[c["kind"]][c["start"]] for c in record["choice"]}
    else:
        chosen = fitted[kind]
    chosen = {a: p for a, p in chosen.items() if p is not None}
    cuts = [] if fit_info is None else [
        _cut_info(fit_info, p.kind, a) for a, p in sorted(chosen.items())]
    info = patch_info(kind, chosen, cuts, fit_info) if fit_info else {"kind": kind, "num_patches": 0, "params": 0}
    info["verification"] = record
    info["warnings"] = warnings
    return chosen, info, warnings


def _cut_info(fit_info: dict, kind: str, a: int) -> dict:
    return next(c for c in fit_info["cuts"][kind] if c["start"] == a)


def verify_patches(heldout: Heldout, removed, fitted: dict, kind: str, own: list[str]) -> tuple[dict, list[str]]:
    """Held-out NLL with each fitted kind at every cut (`uniform`), the per-cut choice among `own`
    (the configured kind, or auto's candidates) and the warnings."""
    runs = runs_of(removed)
    uniform = {k: heldout.nll(removed, fitted[k]) for k in ["none", *[k for k in fitted if k != "none"]]}
    record = {"windows": heldout.num_windows, "nll": uniform, "configured": kind}
    warnings = []
    if kind == "auto":
        choice = choose_per_cut(heldout, removed, fitted, own, uniform)
        record["choice"] = choice
        record["chosen_nll"] = choice[-1]["nll"] if choice else uniform["none"]
        kinds = "/".join(c["kind"] for c in choice)
        log.info("patch=auto chose %s at cuts %s (held-out NLL %.4f; none %.4f)", kinds, runs,
                 record["chosen_nll"], uniform["none"])
    elif kind != "none" and uniform[kind] > uniform["none"] + PATCH_MARGIN:
        best = min(uniform, key=uniform.get)
        warnings.append(
            f"patch={kind} is WORSE than no patch on held-out windows: NLL {uniform[kind]:.4f} vs "
            f"{uniform['none']:.4f} without (PPL x{math.exp(uniform[kind] - uniform['none']):.2f}); "
            f"best here: {best} ({uniform[best]:.4f}); patch=auto would choose per cut")
    for w in warnings:
        log.warning("!!! %s", w)
    return record, warnings


def choose_per_cut(heldout: Heldout, removed, fitted: dict, own: list[str], uniform: dict) -> list[dict]:
    """Start from the best kind in `own` used at every cut, then for each cut in order try every
    kind there with the other cuts fixed, keeping the best. One record per cut:
    `{start, end, kind, nll, candidates: {kind: held-out NLL}}`."""
    runs = runs_of(removed)
    current = {a: min(own, key=uniform.get) for a, _ in runs}
    best_nll = uniform[current[runs[0][0]]]
    out = []
    for a, b in runs:
        cands = {}
        for k in own:
            trial = {**current, a: k}
            if len(runs) == 1 or trial == current:
                cands[k] = uniform[k] if len(runs) == 1 else best_nll
            else:
                cands[k] = heldout.nll(removed, {c: fitted[trial[c]][c] for c, _ in runs})
        current[a] = min(cands, key=cands.get)
        best_nll = cands[current[a]]
        out.append({"start": a, "end": b, "kind": current[a], "nll": best_nll, "candidates": cands})
    return out


# --------------------------------------------------------------------------- selection
def check_selection(heldout: Heldout | None, sel: Selection, rerank: int = 0) -> tuple[Selection, list[str]]:
    """Held-out NLL (no patch) of the chosen layers and of the pruner's next candidates by its own
    score (`sel.info["alternatives"]`, best first, removed from the info), recorded as
    `sel.info["heldout_check"]`. `rerank` > 0 picks the best of the chosen and the next
    `rerank - 1` candidates. Returns `(selection, warnings)`; a no-op without `heldout` or alternatives."""
    alternatives = sel.info.pop("alternatives", None)
    if heldout is None or not alternatives or not sel.removed:
        return sel, []
    ranked = [sel.removed, *[sorted(c) for c in alternatives]]
    k = max(rerank, 1 + CHECK_ALTERNATIVES)
    order = sorted(range(min(k, len(ranked))), key=lambda i: min(ranked[i]))  # reuse the dense prefix
    nll = {i: heldout.nll(ranked[i]) for i in order}
    scored = [{"rank": i, "removed": ranked[i], "nll": nll[i]} for i in sorted(nll)]
    record = {"windows": heldout.num_windows, "patch": "none", "candidates": scored, "rerank": rerank}
    warnings = []
    if rerank:
        best = min(scored[:rerank], key=lambda c: c["nll"])
        record["reranked_from"] = sel.removed
        if best["rank"]:
            log.info("pruner.rerank=%d: candidate #%d %s has held-out NLL %.4f < %.4f of the score's choice %s",
                     rerank, best["rank"], best["removed"], best["nll"], scored[0]["nll"], sel.removed)
            sel = Selection(best["removed"], {**sel.info, "reranked": True})
    chosen_nll = next(c["nll"] for c in scored if c["removed"] == sel.removed)
    better = [c for c in scored if c["nll"] < chosen_nll - RUNNER_UP_MARGIN]
    if better:
        b = min(better, key=lambda c: c["nll"])
        other = sel.info.get("other_variant")
        what = (f"the block of pruner.variant={other['variant']}" if other and b["removed"] == list(range(*other["block"]))
                else f"candidate #{b['rank']} by the pruner's score")
        warnings.append(
            f"selection check: {what} (layers {b['removed']}) has held-out "
            f"NLL {b['nll']:.4f}, much better than the chosen {sel.removed} ({chosen_nll:.4f}) unpatched; "
            f"pruner.rerank={b['rank'] + 1} would pick it")
        log.warning("!!! %s", warnings[-1])
    record["chosen"] = sel.removed
    sel.info["heldout_check"] = record
    return sel, warnings


def check_settings(calib_cfg, kind: str, rerank: int) -> None:
    """`calib.nval` is a count; `patch=auto` and `pruner.rerank` need held-out windows."""
    nval = calib_cfg.get("nval", 0)
    if isinstance(nval, bool) or not isinstance(nval, int) or nval < 0:
        raise ValueError(f"calib.nval={nval!r} must be an integer >= 0 (held-out windows; 0 = off)")
    if not nval and (kind == "auto" or rerank):
        raise ValueError(f"{'patch=auto' if kind == 'auto' else 'pruner.rerank'} chooses by held-out NLL: "
                         "needs calib.nval > 0 held-out windows")
