"""The sweep dashboard: one self-contained HTML page (inline SVG, no JavaScript, opens offline).

Sections: overview, the tables of :mod:`lp.report.tables`, PPL-vs-n curves, per-task accuracy bars,
the pruners' per-layer score curves, the job list and the failures.
"""

from __future__ import annotations

import math
from html import escape

import pandas as pd

from lp.report.svg import PALETTE, bar_chart, html_table, line_chart, page
from lp.report.vocab import (
    KEYS,
    NONE,
    NOTE,
    PPL_SETS,
    cells,
    is_dense,
    n_of,
    num,
    pruner_label,
    variant_label,
)


def _several_patches(df: pd.DataFrame) -> bool:
    return len({p for p in df["patch"] if p not in NONE}) > 1


def _ppl_plots(df: pd.DataFrame) -> list[str]:
    ok = df[df["status"] == "ok"]
    dense, charts, several = is_dense(ok), [], _several_patches(df)
    for model in dict.fromkeys(ok["model"]):
        m, pr = ok[dense & (ok["model"] == model)], ok[~dense & (ok["model"] == model)]
        pruners = list(dict.fromkeys(pr["pruner"]))
        for c in (c for c in df if c.startswith("ppl/")):
            series = []
            for key in dict.fromkeys(zip(pr["pruner"], pr["patch"], pr["distill"], strict=True)):
                g = pr[(pr[["pruner", "patch", "distill"]] == key).all(axis=1)].dropna(subset=["n"])
                g = g.sort_values("n")
                xs, ys = [int(x) for x in g["n"]], [num(y) for y in g[c]]
                if len(m) and math.isfinite(num(m[c].iloc[0])):
                    xs, ys = [0, *xs], [num(m[c].iloc[0]), *ys]
                series.append(dict(name=variant_label(*key, several), xs=xs, ys=ys, dash=key[1] not in NONE,
                                   color=PALETTE[pruners.index(key[0]) % len(PALETTE)]))
            charts.append(line_chart(series, f"{model}: {PPL_SETS.get(c[4:], c[4:])} PPL vs. n",
                                          "removed layers n (0 = dense)", "PPL"))
    return [c for c in charts if c]


def _score_plots(results: list[dict]) -> list[str]:
    curves: dict[tuple, dict[tuple, list]] = {}
    for r in results:
        sc = (r.get("pruning") or {}).get("scores") or {}
        vals = tuple(num(v) for v in sc.get("values") or [])
        if r["status"] == "ok" and vals:
            ch = r.get("choices") or {}
            key = (ch.get("model", "?"), ch.get("pruner", "?"), sc.get("kind", "score"))
            curves.setdefault(key, {}).setdefault(vals, []).append(n_of(r))
    charts = []
    for (model, pruner, kind), by_vals in curves.items():
        series = [dict(name="n=" + ",".join(map(str, sorted(set(ns), key=str))), xs=list(range(len(v))),
                       ys=list(v)) for v, ns in by_vals.items()]
        charts.append(line_chart(series, f"{model}: {pruner_label(pruner)} — {kind}",
                                      "layer / candidate index", "score", logy=False))
    return [c for c in charts if c]


def _qa_plots(qa: pd.DataFrame, df: pd.DataFrame) -> list[str]:
    cats = [c for c in qa if c not in (*KEYS, "RP")]
    by_job = df.set_index(df["job"].astype(str))
    charts, several = [], _several_patches(df)
    for block, g in qa.groupby("block", sort=False):
        series = [("Dense" if r["method"] == "Dense" else
                   variant_label(*by_job.loc[str(r["job"]), ["pruner", "patch", "distill"]], several),
                   [r[c] for c in cats]) for _, r in g.iterrows() if r["status"] == "ok"]
        charts.append(bar_chart(cats, series, f"Accuracy x100 — {block}", "accuracy x100"))
    return [c for c in charts if c]


def _grid(charts: list[str]) -> str:
    return '<div class="grid">' + "\n".join(charts) + "</div>"


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
    qa = [t.frame for t in tables if not t.lower_is_better]
    plots = [("Perplexity vs. number of removed layers (dashed: +LinearPatch)", _ppl_plots(df)),
             ("Per-task accuracy", _qa_plots(qa[0], df) if qa else []),
             ("Layer similarity / importance scores (pruning.scores)", _score_plots(results))]
    sections += [(title, _grid(charts)) for title, charts in plots if charts]
    cols = [c for c in ("job", "status", "name", "n", "removed_layers", "pruned_ratio", "time/total") if c in df]
    jobs = [(str(r["job"]), [("—" if pd.isna(r[c]) else str(r[c]), False) for c in cols[1:]],
             r["status"] != "ok") for _, r in df.iterrows()]
    sections.append(("Jobs", html_table(cols, jobs)))
    fails = "".join(
        f"<h3>job {escape(str(r['job']))}: {r['status']}</h3><p>{escape(str(r['name']))}<br>"
        f"<code>{escape(str(r['dir']))}</code></p><pre>{escape(str(r['error'])[:4000])}</pre>"
        for _, r in failures.iterrows())
    sections.append((f"Failures ({len(failures)})", fails or "<p>None.</p>"))
    return page("LinearPatch sweep dashboard", sections)
