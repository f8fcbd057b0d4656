"""The sweep dashboard: one self-contained HTML page (inline SVG, no JavaScript, opens offline).

Sections: overview, the tables of :mod:`lp.report.tables`, PPL vs. n and vs. removed parameters,
per-task accuracy bars, the calibration similarity heatmap, the pruners' per-layer score curves,
the job list and the failures. This module decides the content; :mod:`lp.report.plots` draws the
charts (matplotlib) and :mod:`lp.report.html` the page.
"""

from __future__ import annotations

import json
import math
from html import escape

import pandas as pd

from lp.methods import label as pruner_label
from lp.report.html import grid, html_table, page
from lp.report.plots import PALETTE, bar_chart, heatmap, line_chart
from lp.report.results import model_name
from lp.report.tables import varying_keys
from lp.report.vocab import (
    CHOSEN,
    KEYS,
    NONE,
    NOTE,
    PPL_SETS,
    STD,
    WARN,
    cells,
    is_dense,
    join_kinds,
    n_of,
    num,
    variant_label,
)


def _variants(pr: pd.DataFrame) -> list[tuple[str, str, bool, pd.DataFrame]]:
    """(legend name, pruner, patched, rows) per pruned variant: pruner, patch, distill and ablation values
    (see :func:`lp.report.tables.varying_keys`); seeds stay together (averaged by the callers)."""
    keys, _ = varying_keys(pr)
    ab = [tuple(str(r.get(k)) for k in keys) for _, r in pr.iterrows()]
    pr = pr.assign(_ab=ab)
    out = []
    for (pruner, patch, distill, v), g in pr.groupby(["pruner", "patch", "distill", "_ab"], sort=False):
        extra = ", ".join(f"{k.split('.')[-1]}={x}" for k, x in zip(keys, v, strict=True) if x not in ("None", "nan"))
        chosen = join_kinds(g[CHOSEN]) if CHOSEN in g else None
        out.append((variant_label(pruner, patch, distill, chosen) + (f" ({extra})" if extra else ""), pruner,
                    patch not in NONE, g))
    return out


def _warned(warnings) -> bool:
    """Whether a summary row's ``warnings`` cell holds any (e.g. the guard's patch worse than none)."""
    return isinstance(warnings, str) and bool(warnings)


def _ppl_plots(df: pd.DataFrame) -> list[str]:
    """Per model and PPL dataset: PPL vs. n and PPL vs. removed parameters (%), Dense at 0; a variant
    with warnings gets ⚠ in its legend entry and at the warned points."""
    ok = df[df["status"] == "ok"]
    dense, charts = is_dense(ok), []
    for model in dict.fromkeys(ok["model"]):
        m, pr = ok[dense & (ok["model"] == model)], ok[~dense & (ok["model"] == model)]
        pruners = list(dict.fromkeys(pr["pruner"]))
        for c in (c for c in df if c.startswith("ppl/")):
            d0 = num(m[c].iloc[0]) if len(m) else math.nan
            by_n, by_params = [], []
            for name, pruner, patched, g in _variants(pr):
                warned = g["warnings"].map(_warned)
                style = dict(name=name + (f" {WARN}" if warned.any() else ""), dash=patched,
                             color=PALETTE[pruners.index(pruner) % len(PALETTE)])
                for x, out in (("n", by_n), ("pruned_ratio_%", by_params)):
                    if x not in g:
                        continue
                    g2 = g.dropna(subset=[x]).assign(_y=g[c].map(num))
                    mean = g2.groupby(x)["_y"].mean().sort_index()
                    xs, ys = [float(v) for v in mean.index], list(mean.values)
                    if math.isfinite(d0):
                        xs, ys = [0.0, *xs], [d0, *ys]
                    out.append(dict(xs=xs, ys=ys, warn={float(v) for v in g2.loc[warned, x]}, **style))
            title = f"{model}: {PPL_SETS.get(c[4:], c[4:])} PPL"
            charts.append(line_chart(by_n, f"{title} vs. n", "removed layers n (0 = dense)", "PPL"))
            charts.append(line_chart(by_params, f"{title} vs. removed parameters", "removed parameters (%)", "PPL"))
    return [c for c in charts if c]


def _score_plots(results: list[dict]) -> list[str]:
    """Each pruner's score curve (pruning.scores), one series per distinct curve, its removed layers
    (per-layer scores) or chosen block start (per-start scores) ringed."""
    curves: dict[tuple, dict[tuple, list]] = {}
    for r in results:
        p = r.get("pruning") or {}
        sc = p.get("scores") or {}
        vals = tuple(num(v) for v in sc.get("values") or [])
        if r["status"] == "ok" and vals:
            ch = r.get("choices") or {}
            key = (model_name(r), ch.get("pruner", "?"), sc.get("kind", "score"))
            removed = p.get("removed_layers") or []
            marks = removed[:1] if str(sc.get("kind", "")).endswith("by_start") else removed
            curves.setdefault(key, {}).setdefault(vals, []).append((n_of(r), tuple(marks)))
    charts = []
    for (model, pruner, kind), by_vals in curves.items():
        series = [dict(name="n=" + ",".join(sorted({str(n) for n, _ in runs}, key=str)), xs=list(range(len(v))),
                       ys=list(v), marks=sorted({i for _, mk in runs for i in mk})) for v, runs in by_vals.items()]
        start = str(kind).endswith("by_start")
        charts.append(line_chart(series, f"{model}: {pruner_label(pruner)} — {kind}",
                                 "block start index" if start else "layer index", "score", logy=False,
                                 mark_label="chosen start" if start else "removed"))
    return [c for c in charts if c]


def _similarity_plots(results: list[dict]) -> list[str]:
    """Pairwise cosine similarity of the layer inputs (pruning.similarity, one per model and
    calibration), each run's removed layers outlined."""
    seen: dict[tuple, tuple[list, set]] = {}
    for r in results:
        p = r.get("pruning") or {}
        if r["status"] == "ok" and p.get("similarity"):
            key = (model_name(r), json.dumps(p["similarity"]))
            seen.setdefault(key, (p["similarity"], set()))[1].update(p.get("removed_layers") or [])
    return [heatmap(mat, sorted(removed), f"{model}: cos(h_i, h_j), calibration tokens")
            for (model, _), (mat, removed) in seen.items()]


def _qa_series(g: pd.DataFrame, cats: list[str]) -> list[dict]:
    """Bars of one QA block: a colour per selection (Dense grey), its patched rows (``+...`` labels,
    named after the row above them) in the same colour, hatched."""
    out, base, colors = [], "", {}
    for _, r in g[g["status"] == "ok"].iterrows():
        patched = r["method"].startswith("+")
        base = base if patched else r["method"]
        color = "#7f7f7f" if base == "Dense" else colors.setdefault(base, PALETTE[len(colors) % len(PALETTE)])
        warn = f" {WARN}" if _warned(r["warnings"]) else ""
        out.append(dict(name=(f"{base} {r['method']}" if patched else r["method"]) + warn,
                        values=[num(r[c]) for c in cats], color=color, hatch="///" if patched else None))
    return out


def _qa_plots(qa: pd.DataFrame) -> list[str]:
    """Per block (n): grouped accuracy bars, one group per task column of the QA table."""
    cats = [c for c in qa if c not in (*KEYS, "RP") and not c.endswith(STD)]
    charts = (bar_chart(cats, _qa_series(g, cats), f"Accuracy x100 — {block}", "accuracy x100")
              for block, g in qa.groupby("block", sort=False))
    return [c for c in charts if c]


def charts(df: pd.DataFrame, results: list[dict], tables) -> dict[str, list[str]]:
    """The dashboard's charts (inline SVG) by section title; also logged to W&B at the end of a sweep."""
    qa = [t.frame for t in tables if not t.lower_is_better]
    return {"Perplexity vs. removed layers and parameters (dashed: patched)": _ppl_plots(df),
            "Per-task accuracy": _qa_plots(qa[0]) if qa else [],
            "Layer similarity (calibration statistics; outlined: removed layers)": _similarity_plots(results),
            "Layer importance scores (pruning.scores; ringed: removed)": _score_plots(results)}


def build(df, results, tables, failures) -> str:
    """The dashboard page for a normalized summary frame, the records, the :class:`lp.report.tables.Table`
    list and the failed/missing rows (see :func:`lp.aggregate.write_all`)."""
    counts = ", ".join(f"{v} {k}" for k, v in df["status"].value_counts().items())
    links = " ".join(f'<a href="{f}">{f}</a>' for f in ("summary.csv", "table.md", "table.tex"))
    sections = [("Overview", f"<p>{len(df)} jobs: {counts}. Files: {links}</p>")]
    for t in tables:
        html = "".join(f"<h3>{escape(b)}</h3>" + html_table(h, rows)
                       for b, h, rows in cells(t.frame, t.lower_is_better, bold=not t.smoke))
        notes = "".join(f"<li>{escape(n)}</li>" for n in t.notes)
        sections.append((t.title, html + f'<p class="{"warn" if t.smoke else "note"}">{escape(t.caption)}</p>'
                         f'<p class="note">{NOTE}</p>' + (f'<ul class="warn">{notes}</ul>' if notes else "")))
    sections += [(title, grid(svgs)) for title, svgs in charts(df, results, tables).items() if svgs]
    cols = [c for c in ("job", "status", "name", "n", "removed_layers", "pruned_ratio_%", "warnings", "time/total")
            if c in df]
    jobs = [(str(r["job"]), [("—" if pd.isna(r[c]) else f"{r[c]:.2f}%" if c.endswith("_%") else
                              f"{WARN} {r[c]}" if c == "warnings" else str(r[c]), False) for c in cols[1:]],
             r["status"] != "ok" or not pd.isna(r.get("warnings"))) for _, r in df.iterrows()]
    sections.append(("Jobs", html_table(cols, jobs)))
    fails = "".join(
        f"<h3>job {escape(str(r['job']))}: {r['status']}</h3><p>{escape(str(r['name']))}<br>"
        f"<code>{escape(str(r['dir']))}</code></p><pre>{escape(str(r['error'])[:4000])}</pre>"
        for _, r in failures.iterrows())
    sections.append((f"Failures ({len(failures)})", fails or "<p>None.</p>"))
    return page("LinearPatch sweep dashboard", sections)
