"""Held-out verification: never ship a patch (or a selection) worse than the alternative unsaid.

Held-out windows (`patch.verify_on`, `calib.nval` of them):
  * `calib` (default): windows of `calib.seqlen` tokens from the tail of the calibration corpus that
    `calib.holdout` reserves (`lp.data.sample_windows`): never used to fit a patch or score a layer;
  * `<corpus>:<split>` (e.g. `wikitext2:validation`): `calib.nval` of the non-overlapping
    `eval.ppl.seqlen` windows of an evaluation corpus split (GPTQ protocol, a seeded draw with
    `calib.seed`), which must not be a split the run reports (`check_settings`).
Per-window NLL = the window's mean next-token NLL (nats); the NLL of a candidate = their mean.

Every decision is a *paired* comparison over the same windows (`paired`): the difference of two
candidates' per-window NLL, its mean, its standard error SE = sd / sqrt(n) (n = windows, the
units: windows are drawn independently, the tokens inside one are not) and whether it is
significant: |mean| >= `SIGNIFICANCE` (2) SE. A warning needs the difference to exceed its margin
AND be significant, and prints it with its SE and n; `patch=auto` and `pruner.rerank` keep the
default (no patch; the score's choice) unless an alternative is significantly better.

`Heldout` replays the *dense* model on those windows with the one replay engine (`lp.replay`):
the stream entering the first layer a candidate removes is computed once (the latest prefix is
kept); each candidate (a set of removed layers, a patch or None per cut) then costs only the
layers after that point, the final norm and the LM head.

  * `verify_patches`: held-out NLL with no patch and with every kind at every cut, of the candidates
    `lp.candidates.fit_candidates` fitted (verification fits nothing), each kind against none (`vs_none`); for `patch=auto` the choice per cut (the best uniform kind, then one
    pass over the cuts trying each kind at that cut, the others fixed; none unless significantly
    beaten); a warning when the configured kind is significantly worse than none by > `PATCH_MARGIN`.
  * `check_selection`: held-out NLL (unpatched) of the chosen layers and of the pruner's next
    candidates by its own score, each against the choice; `pruner.rerank=k` picks the best of the
    top k when significantly better; a warning when a runner-up is significantly better by > `RUNNER_UP_MARGIN`.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch

from lp import data
from lp.candidates import Candidates
from lp.paired import RULE, SIGNIFICANCE, better, beyond, describe, flip, paired  # noqa: F401 (SIGNIFICANCE: API)
from lp.patch import LinearPatch, OutputPatched, runs_of
from lp.patches._mlp import site
from lp.pruners.base import Selection
from lp.replay import Replay, StreamCache

log = logging.getLogger(__name__)

PATCH_MARGIN = 0.01  # nats (~1% PPL): a patch worse than none by more than this (and significantly) is reported
RUNNER_UP_MARGIN = 0.05  # nats (~5% PPL): a runner-up selection better by more than this (and significantly) is reported
CHECK_ALTERNATIVES = 3  # next candidates by the pruner's own score whose held-out NLL is recorded


# --------------------------------------------------------------------------- held-out windows
def heldout(cfg, model, tokenizer, batch_size: int = 1) -> Heldout | None:
    """The run's `Heldout` on `calib.nval` windows of `patch.verify_on` (None when `calib.nval` is 0), in
    batches of `batch_size` (the run's resolved calibration batch size)."""
    if not cfg.calib.get("nval"):
        return None
    windows, source = heldout_set(cfg, tokenizer)
    return Heldout(model, windows, batch_size, source=source)


def verify_on(value) -> tuple[str, str] | None:
    """`patch.verify_on` as `(corpus, split)`, or None for `calib` (the calibration corpus's held-out tail)."""
    value = str(value or "calib")
    if value == "calib":
        return None
    name, sep, split = value.partition(":")
    if not sep or not name or not split:
        raise ValueError(f"patch.verify_on={value!r}: must be 'calib' or '<corpus>:<split>' of an evaluation "
                         f"corpus the run does not report, e.g. 'wikitext2:validation' (corpora: {sorted(data.CORPORA)})")
    return name, split


def heldout_windows(cfg, tokenizer) -> torch.Tensor:
    """The run's held-out windows `[calib.nval, T]` (`heldout_set` without the description)."""
    return heldout_set(cfg, tokenizer)[0]


def heldout_set(cfg, tokenizer) -> tuple[torch.Tensor, dict]:
    """`([calib.nval, T] windows, what they are)`. `calib`: the calibration sampler's held-out tail
    (`lp.data.sample_windows`, T = `calib.seqlen`); `<corpus>:<split>`: a seeded draw (`calib.seed`)
    of `calib.nval` of the split's non-overlapping windows of T = `eval.ppl.seqlen` (`calib.seqlen`
    without PPL evaluation); all of them when the split has fewer (logged, recorded)."""
    c = cfg.calib
    target = verify_on(cfg.patch.get("verify_on"))
    if target is None:
        _, val, prov = data.sample_windows(tokenizer, c.corpus, c.split, c.nsamples, c.seqlen, c.seed, c.holdout,
                                           cfg.data.root, cfg.data.source, nval=c.nval)
        return val, {"on": "calib", "seqlen": c.seqlen, "windows": len(val), "corpus": prov.get("corpus"),
                     "split": prov.get("split"), "source": prov.get("source"), "holdout": c.holdout}
    name, split = target
    seqlen = cfg.eval.ppl.seqlen if cfg.eval.get("ppl") else c.seqlen
    if data.corpus(name).documents:
        rows, prov = data.load_rows(name, split, cfg.data.root, cfg.data.source)
        win = data.document_windows(tokenizer, rows, c.nval, seqlen, c.seed, holdout=0.0)[0]
    else:
        win, prov = data.eval_windows(tokenizer, name, split, seqlen, cfg.data.root, cfg.data.source)
        if len(win) > c.nval:
            # a prefix of one seeded permutation, in its order: the draw for nval=k is the first k of any larger draw
            win = win[torch.randperm(len(win), generator=torch.Generator().manual_seed(c.seed))[:c.nval]]
        elif len(win) < c.nval:
            log.warning("patch.verify_on=%s:%s has only %d windows of %d tokens (calib.nval=%d): verifying on all of them",
                        name, split, len(win), seqlen, c.nval)
    return win, {"on": f"{name}:{split}", "seqlen": seqlen, "windows": len(win), "corpus": name, "split": split,
                 "source": prov.get("source"), "seed": c.seed}


class Heldout:
    """Held-out NLL of the dense `model` with layers removed and patches at the cuts.

    `windows` [N, T] token ids; `source`: what they are (recorded with every verification).
    `window_nll(removed, patches)` -> per-window NLL `[N]` (float64); `nll(...)` its mean.
    `removed` dense indices, `patches` {run start a: LinearPatch or None}; the patch of run [a, b)
    multiplies the stream entering dense layer b (the final norm when b = L). The dense prefix before
    the first removed layer is cached (`lp.replay.StreamCache`: h_0 and the latest two starts)."""

    def __init__(self, model, windows: torch.Tensor, batch_size: int = 1, source: dict | None = None):
        self.replay = Replay(model, windows, batch_size)
        self.num_layers = self.replay.num_layers
        self.num_windows = len(windows)
        self.source = source or {"on": "given", "seqlen": windows.shape[1], "windows": len(windows)}
        self._streams: StreamCache | None = None  # h_0 and two buffers (h_{a-1} for mlp-site patches beside h_a)
        self.calls = 0

    def _stream(self, start: int) -> torch.Tensor:
        """The dense stream entering layer `start` [N, T, D] (a cached tensor: do not modify)."""
        if self._streams is None:
            # positions 0..L are the streams entering layers 0..L-1 and h_L (the last entry never runs)
            self._streams = StreamCache(self.replay, list(range(self.num_layers + 1)), 0, buffers=2)
        return self._streams.get(start)

    @torch.inference_mode()
    def window_nll(self, removed, patches: dict[int, LinearPatch | None] | None = None) -> torch.Tensor:
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
        return self.replay.nll(x, [])

    def nll(self, removed, patches: dict[int, LinearPatch | None] | None = None) -> float:
        return self.window_nll(removed, patches).mean().item()


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
def _where(heldout: Heldout) -> str:
    s = heldout.source
    return "the calibration holdout" if s.get("on") == "calib" else s.get("on", "given windows")


def verify_patches(heldout: Heldout, cands: Candidates) -> tuple[dict, list[str]]:
    """Verify the fitted candidates `cands` (`lp.candidates.fit_candidates`): held-out NLL with each kind
    at every cut (`nll`, and `vs_none`: each kind's paired difference to no patch), for `patch=auto` the
    per-cut choice among `cands.own` (`choice`), `seconds` (fit, verify) and the warnings."""
    t0 = time.perf_counter()
    removed, fitted, kind = cands.removed, cands.patches, cands.kind
    vectors = {k: heldout.window_nll(removed, fitted[k]) for k in ["none", *[k for k in fitted if k != "none"]]}
    uniform = {k: v.mean().item() for k, v in vectors.items()}
    vs_none = {k: paired(v, vectors["none"]) for k, v in vectors.items() if k != "none"}
    record = {"windows": heldout.num_windows, "data": heldout.source, "rule": RULE, "margin": PATCH_MARGIN,
              "nll": uniform, "vs_none": vs_none, "configured": kind}
    warnings = []
    if kind == "auto":
        choice = choose_per_cut(heldout, removed, fitted, cands.own, vectors)
        record["choice"] = choice
        record["chosen_nll"] = choice[-1]["nll"] if choice else uniform["none"]
        record["significant"] = any(c["significant"] for c in choice)
        kinds = "/".join(c["kind"] for c in choice)
        log.info("patch=auto chose %s at cuts %s (held-out NLL %.4f; none %.4f; %s)", kinds, runs_of(removed),
                 record["chosen_nll"], uniform["none"],
                 "; ".join(f"cut {c['start']}: {c['best']} vs none {describe(c['best_vs_none'])}" for c in choice))
    elif kind != "none" and beyond(vs_none[kind], PATCH_MARGIN):
        best = min(uniform, key=uniform.get)
        warnings.append(
            f"patch={kind} is WORSE than no patch on held-out windows ({_where(heldout)}): NLL {uniform[kind]:.4f} vs "
            f"{uniform['none']:.4f} without, difference {describe(vs_none[kind])} "
            f"(PPL x{math.exp(vs_none[kind]['diff']):.2f}); best here: {best} ({uniform[best]:.4f}); "
            f"patch=auto would choose per cut")
    elif kind != "none" and vs_none[kind]["diff"] > PATCH_MARGIN:
        log.info("patch=%s vs no patch on held-out windows: %s, not significant (no warning)", kind,
                 describe(vs_none[kind]))
    for w in warnings:
        log.warning("!!! %s", w)
    record["seconds"] = {"fit": round(cands.seconds, 3), "verify": round(time.perf_counter() - t0, 3)}
    return record, warnings


def choose_per_cut(heldout: Heldout, removed, fitted: dict, own: list[str], vectors: dict) -> list[dict]:
    """Start from the best kind in `own` at every cut (kept only when significantly better than no
    patch anywhere), then for each cut in order try every kind there with the other cuts fixed. A
    cut keeps no patch unless the best kind there is significantly better than none there (when
    `none` is not among `own`: simply the best). `vectors`: per-window NLL of each fitted kind used
    at every cut. One record per cut: `{start, end, kind, nll, candidates: {kind: held-out NLL},
    best (lowest NLL), best_vs_none, vs_runner_up (chosen vs the next best kind), significant}`
    (`significant`: the chosen kind is significantly better than no patch at that cut)."""
    runs = runs_of(removed)
    memo = {tuple(k for _ in runs): v for k, v in vectors.items()}

    def vec(assign: dict) -> torch.Tensor:
        key = tuple(assign[a] for a, _ in runs)
        if key not in memo:
            memo[key] = heldout.window_nll(removed, {a: fitted[assign[a]][a] for a, _ in runs})
        return memo[key]

    def mean(v: torch.Tensor) -> float:
        return v.mean().item()

    def decide(vecs: dict, base: torch.Tensor) -> tuple[str, str, dict]:
        best = min(vecs, key=lambda k: mean(vecs[k]))
        cmp = paired(vecs[best], base)
        return ("none" if "none" in vecs and best != "none" and not better(cmp) else best), best, cmp

    start = decide({k: vectors[k] for k in own}, vectors["none"])[0]
    current = {a: start for a, _ in runs}
    out = []
    for a, b in runs:
        vecs = {k: vec({**current, a: k}) for k in own}
        base = vec({**current, a: "none"})
        chosen, best, best_vs_none = decide(vecs, base)
        others = [k for k in vecs if k != chosen]
        runner = min(others, key=lambda k: mean(vecs[k])) if others else None
        current[a] = chosen
        out.append({"start": a, "end": b, "kind": chosen, "nll": mean(vecs[chosen]),
                    "candidates": {k: mean(v) for k, v in vecs.items()}, "best": best, "best_vs_none": best_vs_none,
                    "vs_runner_up": None if runner is None else {"kind": runner, **paired(vecs[chosen], vecs[runner])},
                    "significant": chosen != "none" and better(paired(vecs[chosen], base))})
    return out


# --------------------------------------------------------------------------- selection
def check_selection(heldout: Heldout | None, sel: Selection, rerank: int = 0) -> tuple[Selection, list[str]]:
    """Held-out NLL (no patch) of the chosen layers and of the pruner's next candidates by its own
    score (`sel.info["alternatives"]`, best first, removed from the info), recorded as
    `sel.info["heldout_check"]` with each candidate's paired difference to the final choice
    (`vs_chosen`). `rerank` > 0 picks the best of the chosen and the next `rerank - 1` candidates
    when it is significantly better than the score's choice. Returns `(selection, warnings)`; a
    no-op without `heldout` or alternatives."""
    alternatives = sel.info.pop("alternatives", None)
    if heldout is None or not alternatives or not sel.removed:
        return sel, []
    ranked = [sel.removed, *[sorted(c) for c in alternatives]]
    k = max(rerank, 1 + CHECK_ALTERNATIVES)
    order = sorted(range(min(k, len(ranked))), key=lambda i: min(ranked[i]))  # reuse the dense prefix
    vec = {i: heldout.window_nll(ranked[i]) for i in order}
    scored = [{"rank": i, "removed": ranked[i], "nll": vec[i].mean().item()} for i in sorted(vec)]
    record = {"windows": heldout.num_windows, "data": heldout.source, "rule": RULE, "margin": RUNNER_UP_MARGIN,
              "patch": "none", "candidates": scored, "rerank": rerank}
    warnings = []
    chosen_rank = 0
    if rerank:
        best = min(scored[:rerank], key=lambda c: c["nll"])
        cmp = paired(vec[best["rank"]], vec[0])
        record["reranked_from"] = sel.removed
        record["rerank_significant"] = bool(best["rank"]) and better(cmp)
        if best["rank"] and better(cmp):
            log.info("pruner.rerank=%d: candidate #%d %s has held-out NLL %.4f < %.4f of the score's choice %s (%s)",
                     rerank, best["rank"], best["removed"], best["nll"], scored[0]["nll"], sel.removed, describe(cmp))
            sel = Selection(best["removed"], {**sel.info, "reranked": True})
            chosen_rank = best["rank"]
        elif best["rank"]:
            log.info("pruner.rerank=%d: candidate #%d is better by %s, not significant: the score's choice stays",
                     rerank, best["rank"], describe(cmp))
    for c in scored:
        c["vs_chosen"] = None if c["rank"] == chosen_rank else paired(vec[c["rank"]], vec[chosen_rank])
    chosen_nll = scored[chosen_rank]["nll"]
    better_ones = [c for c in scored if c["vs_chosen"] is not None and beyond(flip(c["vs_chosen"]), RUNNER_UP_MARGIN)]
    if better_ones:
        b = min(better_ones, key=lambda c: c["nll"])
        other = sel.info.get("other_variant")
        what = (f"the block of pruner.variant={other['variant']}" if other and b["removed"] == list(range(*other["block"]))
                else f"candidate #{b['rank']} by the pruner's score")
        warnings.append(
            f"selection check: {what} (layers {b['removed']}) has held-out NLL {b['nll']:.4f}, much better than "
            f"the chosen {sel.removed} ({chosen_nll:.4f}) unpatched ({_where(heldout)}): difference "
            f"{describe(b['vs_chosen'])}; pruner.rerank={b['rank'] + 1} would pick it")
        log.warning("!!! %s", warnings[-1])
    record["chosen"] = sel.removed
    sel.info["heldout_check"] = record
    return sel, warnings


# --------------------------------------------------------------------------- settings
# Corpora that hold the same text under two names (raw and tokenized WikiText-2): one split of either is the other's.
SAME_TEXT = {"wikitext2_tok": "wikitext2"}


def check_settings(calib_cfg, kind: str, rerank: int, verify_on_value: str | None = None,
                   reported: list[tuple[str, str]] = ()) -> None:
    """`calib.nval` is 0 (off) or a count >= 2 (a standard error needs two windows); `patch=auto` and
    `pruner.rerank` need held-out windows; `patch.verify_on` is `calib` or `<corpus>:<split>` of a
    known corpus and split that is not one of the `reported` `(corpus, split)` PPL sets."""
    nval = calib_cfg.get("nval", 0)
    if isinstance(nval, bool) or not isinstance(nval, int) or nval < 0 or nval == 1:
        raise ValueError(f"calib.nval={nval!r} must be 0 (held-out checks off) or an integer >= 2 "
                         "(held-out windows; the standard error of a difference needs two)")
    if not nval and (kind == "auto" or rerank):
        raise ValueError(f"{'patch=auto' if kind == 'auto' else 'pruner.rerank'} chooses by held-out NLL: "
                         "needs calib.nval > 0 held-out windows")
    target = verify_on(verify_on_value)
    if target is None:
        return
    name, split = target
    c = data.corpus(name)  # unknown corpus: the error listing them
    if split not in c.splits:
        raise ValueError(f"patch.verify_on={verify_on_value!r}: corpus {name!r} has no split {split!r}; "
                         f"choose one of {list(c.splits)}")
    same = SAME_TEXT.get(name, name)
    for rname, rsplit in reported:
        if SAME_TEXT.get(rname, rname) == same and rsplit == split:
            raise ValueError(f"patch.verify_on={verify_on_value!r} is the split this run reports (eval.ppl: "
                             f"{rname}:{rsplit}): verification must not see the reported data; use another split, "
                             f"e.g. {name}:validation when reporting test, or 'calib'")
