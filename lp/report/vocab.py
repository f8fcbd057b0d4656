"""The reporting vocabulary, defined once: display labels, the dense/n helpers and table cells.

Pruner labels come from :mod:`lp.methods` (the catalogue the pipeline reads too).

Used by :mod:`lp.report.tables`, :mod:`lp.report.render` and :mod:`lp.report.dashboard` (and so by
``summary.csv``, ``table.md``/``.tex`` and ``dashboard.html`` alike). Nothing here reads files.
"""

from __future__ import annotations

import math

import pandas as pd

from lp.methods import label as pruner_label

PPL_SETS = {"wikitext2": "WikiText2", "ptb": "PTB", "c4": "C4"}
# Display name of each QA task (lm-eval name -> table column), in the paper's column order.
TASK_NAMES = {"wsc273": "WSC", "wsc": "WSC", "hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-e",
              "arc_challenge": "ARC-c", "boolq": "BoolQ", "winogrande": "WinoGrande", "race": "RACE",
              "copa": "COPA"}
DENSE, NONE = {"none", "dense"}, {None, "none", "null", ""}
# Row name of a patch kind where it is not the kind's own name: `rotate` is the paper's LinearPatch; every
# other kind (lstsq, diag, scalar, lstsq_mlp, rotate_mlp, ...) names its own method, so no row credits
# LinearPatch with another estimator's numbers. `auto` rows add the kinds it chose (:data:`CHOSEN`).
PATCH_LABELS = {"rotate": "LinearPatch"}
CHOSEN = "patch_chosen"  # summary column: the kinds patch=auto chose in a run, e.g. "lstsq/diag"
KEYS = ("block", "method", "status", "job", "runs", "warnings")  # non-value columns of a table frame
RATIO = "Pruned %"  # parameters removed (x100); shown when a block mixes different ratios; never bolded
STD = " std"  # suffix of a value column's standard deviation (rows averaged over seeds)
WARN = "⚠"  # marks a row whose run recorded warnings (e.g. patch worse than none)
# Joins a run's warnings in one flat cell (summary.csv, table frames); messages may contain "; ".
WARN_SEP = " | "
NOTE = "Bold: best successful pruned row per block. —: not available (failed/missing: see Failures)."
# Config keys whose values are repetitions, not settings: rows differing only in them are averaged.
SEED_KEYS = ("seed", "patch.hadamard_seed", "calib.seed")
# Config prefixes that belong to a block (model, evaluation), never to a row label.
BLOCK_KEYS = ("model.", "eval.", "data.", "pruner.n")


def is_seed_key(key: str) -> bool:
    return key in SEED_KEYS or key.endswith("_seed")


def join_kinds(values) -> str | None:
    """The distinct patch kinds of ``"/"``-joined cells (e.g. :data:`CHOSEN` of a row's runs), first seen
    first, ``"/"``-joined; None when there is none (NaN, None and empty cells skipped)."""
    kinds = [k for v in values if isinstance(v, str) for k in v.split("/") if k]
    return "/".join(dict.fromkeys(kinds)) or None


def patch_label(patch: str, chosen: str | None = None) -> str:
    """Row name of a patch kind (see :data:`PATCH_LABELS`); with ``chosen`` (``patch=auto``: the kinds it
    chose, ``"/"``-joined) the choice too, e.g. "auto → lstsq"."""
    label = PATCH_LABELS.get(patch, patch)
    return f"{label} → {chosen}" if chosen else label


def variant_label(pruner: str, patch: str, distill: str, chosen: str | None = None) -> str:
    """Self-contained name of a pruned variant, e.g. "ShortGPT +LinearPatch", "SLEB +lstsq",
    "ShortGPT +auto → lstsq/diag" (``chosen``: see :func:`patch_label`)."""
    return (pruner_label(pruner) + ("" if patch in NONE else f" +{patch_label(patch, chosen)}")
            + ("" if distill in NONE else f" +{distill}"))


def num(v) -> float:
    """``float(v)``, NaN for anything that is not a number (None, strings, missing)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def parse_overrides(overrides) -> dict[str, str]:
    """``["pruner.n=4", "+x=1"]`` -> ``{"pruner.n": "4", "x": "1"}``."""
    return {k.lstrip("+~"): v for k, s, v in (o.partition("=") for o in overrides or []) if s}


def n_of(r: dict) -> int | None:
    """Number of removed layers of a result record: ``pruning.n``, else its override or config, else 0
    for a dense pruner; None when unknown."""
    n = (r.get("pruning") or {}).get("n")
    if n is None:
        n = parse_overrides(r.get("overrides")).get("pruner.n")
    if n is None:
        n = ((r.get("config") or {}).get("pruner") or {}).get("n")
    if n is None and (r.get("choices") or {}).get("pruner") in DENSE:
        n = 0
    try:
        return int(n)
    except (TypeError, ValueError):
        return None


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of a summary frame whose model/pruner/patch/distill columns exist and hold no NaN."""
    df = df.copy()
    for c, fill in (("model", "?"), ("pruner", "?"), ("patch", "none"), ("distill", "none")):
        df[c] = df[c].astype(object).where(df[c].notna(), fill) if c in df else fill
    return df


def is_dense(df: pd.DataFrame) -> pd.Series:
    """Rows of a normalized summary frame that are dense references (dense pruner, or ok with n = 0)."""
    return df["pruner"].isin(DENSE) | ((df["n"] == 0).fillna(False) & (df["status"] == "ok"))


def cells(table: pd.DataFrame, lower_is_better: bool, bold: bool = True):
    """[(block, header, [(label, [(text, bold)], bad)])] of a table frame of :mod:`lp.report.tables`.

    Text has 2 decimals (``mean ± std`` where the frame has a std column); with ``bold`` the best
    value per block and column is bold, among successful pruned rows (never Dense). A row whose runs
    recorded warnings gets :data:`WARN` after its label."""
    cols = [c for c in table if c not in KEYS and not c.endswith(STD)]
    out = []
    for block, g in table.groupby("block", sort=False):
        cand = g[(g["status"] == "ok") & (g["method"] != "Dense")]
        best = {c: (cand[c].round(2).min() if lower_is_better else cand[c].round(2).max()) for c in cols}
        rows = []
        for _, r in g.iterrows():
            texts = []
            for c in cols:
                sd = r.get(c + STD)
                text = "—" if pd.isna(r[c]) else f"{r[c]:.2f}" + ("" if pd.isna(sd) else f" ± {sd:.2f}")
                win = bold and c != RATIO and not pd.isna(r[c]) and r["status"] == "ok" and r["method"] != "Dense" \
                    and round(r[c], 2) == best[c]
                texts.append((text, win))
            warn = f" {WARN}" if isinstance(r.get("warnings"), str) and r["warnings"] else ""
            rows.append((r["method"] + warn, texts, r["status"] != "ok"))
        out.append((block, ["Method", *cols], rows))
    return out
