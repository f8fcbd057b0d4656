"""The dashboard's charts, drawn with matplotlib and returned as inline ``<svg>`` text.

The functions take plain lists (what to draw is decided by :mod:`lp.report.dashboard`) and return
one ``<svg>`` element, or "" when there is nothing to draw. Conventions:

* matplotlib is imported inside the functions, so ``import lp`` stays light, and used only through
  :class:`matplotlib.figure.Figure`: no pyplot state, and no ``matplotlib.use`` that would switch the
  backend of a notebook that happens to build a dashboard.
* Text stays text (``svg.fonttype: none``): titles, labels and legends are ``<text>`` elements.
* Deterministic: no date or creator metadata, and ``svg.hashsalt`` is the chart's title, so the same
  input gives byte-identical SVG while two charts of one page get different clip-path ids.
* The XML prolog, DOCTYPE and xlink namespace declaration are stripped (inline SVG in HTML needs
  none of them), so the page references nothing outside itself.
* Stable element ids for checks: ``removed-<i>`` (rings on series ``i``), ``warn`` (⚠ annotations),
  ``cells`` (heatmap cells), ``removed-row-<i>`` / ``removed-col-<i>`` (heatmap frames).
"""

from __future__ import annotations

import io
import math
import numbers
from contextlib import contextmanager

from lp.report.vocab import WARN

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
           "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
RED = "#d62728"  # removed layers, warnings
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10.5, "axes.titleweight": "bold",
       "axes.grid": True, "grid.color": "#e6e6e6", "axes.axisbelow": True, "axes.spines.top": False,
       "axes.spines.right": False, "legend.fontsize": 8, "legend.frameon": False}
_W, _H, _LEGEND_COLS = 6.0, 3.4, 2  # figure inches (72 pt each in the SVG); legend columns


def _finite(v) -> bool:
    return isinstance(v, numbers.Real) and math.isfinite(v)


@contextmanager
def _figure(title: str, w: float = _W, h: float = _H, legend: int = 0):
    """A constrained-layout Figure under the dashboard's rcParams, ``legend`` entries of room below."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"lp-dashboard:{title}"}):
        fig = Figure(figsize=(w, h + 0.18 * math.ceil(legend / _LEGEND_COLS)), layout="constrained")
        try:
            yield fig
        finally:
            fig.clear()


def _axes(fig, title: str, xlabel: str, ylabel: str):
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return ax


def _svg(fig, ax=None) -> str:
    """The figure as an inline ``<svg>`` element (with the legend of ``ax`` below the plot)."""
    if ax is not None and (entries := ax.get_legend_handles_labels())[0]:
        fig.legend(*entries, loc="outside lower center", ncols=min(len(entries[0]), _LEGEND_COLS))
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=dict.fromkeys(("Date", "Creator", "Format", "Type")))
    text = buf.getvalue()
    return text[text.index("<svg"):].replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "", 1).strip()


def _draw_series(ax, i: int, s: dict, pts: list[tuple[float, float]], mark_label: str | None) -> bool:
    """One line of :func:`line_chart`; returns whether it ringed any point."""
    color = s.get("color") or PALETTE[i % len(PALETTE)]
    ax.plot(*zip(*pts, strict=True), color=color, ls="--" if s.get("dash") else "-", lw=1.8,
            marker="o", ms=3.5, label=s["name"])
    marks, warn = set(s.get("marks") or ()), set(s.get("warn") or ())
    ringed = [p for p in pts if p[0] in marks]
    if ringed:
        ax.scatter(*zip(*ringed, strict=True), s=90, facecolors="none", edgecolors=color, linewidths=1.6,
                   zorder=3, gid=f"removed-{i}", label=mark_label)
    for x, y in (p for p in pts if p[0] in warn):  # a red diamond on the point, ⚠ to its right
        ax.plot([x], [y], marker="D", ms=7, mfc="white", mec=RED, mew=1.8, zorder=4)
        ax.annotate(WARN, (x, y), xytext=(7, 0), textcoords="offset points", ha="left", va="center",
                    color=RED, fontsize=12, gid="warn", zorder=4,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
    return bool(ringed)


def _log_y(ax) -> None:
    """A log y axis labelled 1, 2, 5 x 10^k in plain numbers (PPL spans are short)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def line_chart(series: list[dict], title: str, xlabel: str, ylabel: str, *, logy: bool | None = None,
               mark_label: str = "removed") -> str:
    """Lines with point markers. ``series``: dicts with ``name``, ``xs``, ``ys`` and optional ``color``,
    ``dash`` (dashed line), ``marks`` (x values whose points get a ring, e.g. the removed layers; legend
    entry ``mark_label``) and ``warn`` (x values whose points get a red ⚠).

    Non-finite points are skipped; ``logy=None`` picks a log axis when the data span > 20x."""
    from matplotlib.ticker import MaxNLocator

    data = [[(x, y) for x, y in zip(s["xs"], s["ys"], strict=True) if _finite(x) and _finite(y)] for s in series]
    ys = [y for pts in data for _, y in pts]
    if not ys:
        return ""
    if logy is None:
        logy = min(ys) > 0 and max(ys) / min(ys) > 20
    logy = logy and min(ys) > 0
    with _figure(title, legend=len(series) + 1) as fig:
        ax = _axes(fig, title, xlabel, ylabel + (" (log scale)" if logy else ""))
        if logy:
            _log_y(ax)
        label = mark_label
        for i, (s, pts) in enumerate(zip(series, data, strict=True)):
            if pts and _draw_series(ax, i, s, pts, label):
                label = None  # one legend entry for the rings
        if all(float(x).is_integer() for pts in data for x, _ in pts):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.12)  # room for the ⚠ above the highest point
        return _svg(fig, ax)


def bar_chart(categories: list[str], series: list[dict], title: str, ylabel: str) -> str:
    """Grouped bars: one group per category, one bar per series (dicts with ``name``, ``values``
    aligned with ``categories`` and optional ``color``/``hatch``); non-finite values get no bar."""
    k = len(series)
    if not categories or not any(_finite(v) for s in series for v in s["values"]):
        return ""
    width = 0.8 / k
    with _figure(title, max(_W, 1.6 + 0.16 * k * len(categories)), legend=k) as fig:
        ax = _axes(fig, title, "", ylabel)
        for i, s in enumerate(series):
            bars = [(j + (i - (k - 1) / 2) * width, v) for j, v in enumerate(s["values"][:len(categories)])
                    if _finite(v)]
            if bars:
                ax.bar(*zip(*bars, strict=True), width * 0.9, label=s["name"], hatch=s.get("hatch"),
                       color=s.get("color") or PALETTE[i % len(PALETTE)], edgecolor="white", linewidth=0.5)
        tilt = len(categories) > 5 or max(map(len, categories)) > 12
        ax.set_xticks(range(len(categories)), categories, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.grid(axis="x", visible=False)
        return _svg(fig, ax)


def heatmap(matrix: list[list[float]], outlined: list[int], title: str, label: str = "cosine similarity") -> str:
    """A square matrix as coloured cells (cell (i, j) = ``matrix[i][j]``, row 0 on top), the colour
    scale from the 10th percentile (an outlier row, e.g. the embeddings, keeps the contrast; lower
    values share its colour) to the max; rows and columns listed in ``outlined`` framed in red."""
    import numpy as np
    from matplotlib.patches import Rectangle

    m = np.ma.masked_invalid(np.array([[v if _finite(v) else np.nan for v in row] for row in matrix], dtype=float))
    n, vals = len(m), np.sort(m.compressed())
    if not n or not vals.size:
        return ""
    with _figure(title, 5.2, 4.5) as fig:
        ax = _axes(fig, title, "layer input index j (red: removed)", "layer input index i")
        ax.grid(False)
        mesh = ax.pcolormesh(m, cmap="Blues", vmin=vals[len(vals) // 10], vmax=vals[-1], gid="cells")
        fig.colorbar(mesh, ax=ax, label=label, extend="min", shrink=0.85)
        ticks = list(range(0, n, max(1, n // 10)))
        ax.set_xticks([t + 0.5 for t in ticks], ticks)
        ax.set_yticks([t + 0.5 for t in ticks], ticks)
        ax.set(xlim=(0, n), ylim=(n, 0), aspect="equal")
        for i in (i for i in outlined if 0 <= i < n):
            for gid, xy, wh in (("row", (0, i), (n, 1)), ("col", (i, 0), (1, n))):
                ax.add_patch(Rectangle(xy, *wh, fill=False, ec=RED, lw=1.4, gid=f"removed-{gid}-{i}"))
        return _svg(fig)
