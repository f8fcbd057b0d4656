"""Dependency-free, static HTML/SVG building blocks for the dashboard (:mod:`lp.report.dashboard`).

Everything is rendered in Python: charts are inline ``<svg>`` elements, the page has no
JavaScript and references nothing outside itself, so it opens offline from disk.
The *content* (which curves, which tables) is decided by :mod:`lp.report.dashboard`.
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
           "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
_M = {"l": 62, "r": 14, "t": 28, "b": 44}  # plot margins (px)
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}tr.bad td{background:#fff1f0;color:#a00}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid svg{border:1px solid #eee;background:#fff}
pre{white-space:pre-wrap;background:#f8f8f8;padding:6px;font-size:.85em;max-height:240px;overflow:auto}
.note{color:#666;font-size:.88em}.warn{color:#a00;font-weight:600}
"""


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    return [start + i * step for i in range(round((end - start) / step) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    b = max(b, a + 1)
    mults = (1, 2, 5) if b - a <= 2 else (1,)
    return [m * 10 ** e for e in range(a, b + 1) for m in mults if m * 10 ** e <= 10 ** b]


def _frame(w, h, title, xlabel, ylabel, yticks, ymap, legend) -> list[str]:
    """SVG header, title, y grid + labels, axis labels and legend (below the plot)."""
    cw = max(150, 6 * max((len(n) for n, _, _ in legend), default=0) + 36)  # legend column width
    cols = max(1, (w - _M["l"]) // cw)
    rows = math.ceil(len(legend) / cols)
    total_h = h + rows * 16 + (6 if rows else 0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total_h}" '
           f'viewBox="0 0 {w} {total_h}" font-size="11" font-family="sans-serif">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
           f"{escape(title)}</text>"]
    x0, x1 = _M["l"], w - _M["r"]
    for t in yticks:
        y = ymap(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{x0 - 4}" y="{y + 3.5:.1f}" text-anchor="end">{_fmt(t)}</text>')
    yb = h - _M["b"]
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{yb}" y2="{yb}" stroke="#333"/>'
               f'<line x1="{x0}" x2="{x0}" y1="{_M["t"]}" y2="{yb}" stroke="#333"/>'
               f'<text x="{(x0 + x1) / 2}" y="{h - 8}" text-anchor="middle">{escape(xlabel)}</text>'
               f'<text transform="translate(13,{(_M["t"] + yb) / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    for i, (name, color, dash) in enumerate(legend):
        lx, ly = x0 + (i % cols) * cw, h + 4 + (i // cols) * 16
        da = ' stroke-dasharray="5,3"' if dash else ""
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly + 6}" y2="{ly + 6}" stroke="{color}" '
                   f'stroke-width="2.5"{da}/><text x="{lx + 27}" y="{ly + 10}">{escape(name)}</text>')
    return out


def line_chart(series: list[dict], title: str, xlabel: str, ylabel: str, *, logy: bool | None = None,
               w: int = 520, h: int = 300) -> str:
    """``series``: dicts with ``name``, ``xs``, ``ys`` and optional ``color``/``dash``/``markers`` and
    ``marks`` (x values whose points get a ring, e.g. the removed layers).

    Non-finite points are skipped; ``logy=None`` picks a log axis when the data span > 20x.
    """
    pts = [(x, y) for s in series for x, y in zip(s["xs"], s["ys"], strict=True) if _finite(x) and _finite(y)]
    if not pts:
        return ""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if logy is None:
        logy = min(ys) > 0 and max(ys) / min(ys) > 20
    logy = logy and min(ys) > 0
    yt = _log_ticks(min(ys), max(ys)) if logy else _linear_ticks(min(ys), max(ys))
    f = math.log10 if logy else (lambda v: v)
    ylo, yhi = f(yt[0]), f(yt[-1])
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    x0, x1, yt_px, yb = _M["l"] + 8, w - _M["r"] - 8, _M["t"], h - _M["b"]

    def xm(v):
        return x0 + (v - xlo) / (xhi - xlo) * (x1 - x0)

    def ym(v):
        return yb - (f(v) - ylo) / ((yhi - ylo) or 1) * (yb - yt_px)

    colors = [s.get("color") or PALETTE[i % len(PALETTE)] for i, s in enumerate(series)]
    out = _frame(w, h, title, xlabel, ylabel + (" (log)" if logy else ""), yt, ym,
                 [(s["name"], c, s.get("dash")) for s, c in zip(series, colors, strict=True)])
    for t in _linear_ticks(xlo, xhi, 6 if xhi - xlo > 6 else max(1, int(xhi - xlo))):
        if xlo <= t <= xhi:
            out.append(f'<text x="{xm(t):.1f}" y="{yb + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for s, c in zip(series, colors, strict=True):
        p = [(x, y) for x, y in zip(s["xs"], s["ys"], strict=True) if _finite(x) and _finite(y)]
        da = ' stroke-dasharray="5,3"' if s.get("dash") else ""
        line = " ".join(f"{xm(x):.1f},{ym(y):.1f}" for x, y in p)
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{da} points="{line}"/>')
        if s.get("markers", True):
            out += [f'<circle cx="{xm(x):.1f}" cy="{ym(y):.1f}" r="2.8" fill="{c}">'
                    f"<title>{escape(s['name'])}: x={_fmt(x)}, y={_fmt(y)}</title></circle>" for x, y in p]
        marks = set(s.get("marks") or ())
        out += [f'<circle class="mark" cx="{xm(x):.1f}" cy="{ym(y):.1f}" r="6" fill="none" stroke="{c}" '
                f'stroke-width="2"><title>{escape(s["name"])}: removed, x={_fmt(x)}</title></circle>'
                for x, y in p if x in marks]
    return "\n".join(out + ["</svg>"])


def bar_chart(categories: list[str], series: list[tuple[str, list[float]]], title: str,
              ylabel: str, *, h: int = 300) -> str:
    """Grouped bars: one group per category, one bar per series (name, values)."""
    vals = [v for _, vs in series for v in vs if _finite(v)]
    if not vals or not categories:
        return ""
    bw = 9 if len(series) > 4 else 13
    gw = bw * len(series) + 14
    w = max(520, _M["l"] + _M["r"] + gw * len(categories) + 10)
    yt = _linear_ticks(min(0.0, min(vals)), max(vals))
    yb, ytop = h - _M["b"], _M["t"]

    def ym(v):
        return yb - (v - yt[0]) / (yt[-1] - yt[0]) * (yb - ytop)

    legend = [(name, PALETTE[i % len(PALETTE)], False) for i, (name, _) in enumerate(series)]
    out = _frame(w, h, title, "", ylabel, yt, ym, legend)
    for j, cat in enumerate(categories):
        gx = _M["l"] + 10 + j * gw
        out.append(f'<text x="{gx + gw / 2 - 7:.1f}" y="{yb + 14}" text-anchor="middle">{escape(cat)}</text>')
        for i, (name, vs) in enumerate(series):
            v = vs[j] if j < len(vs) else None
            if _finite(v):
                top, base = ym(max(v, yt[0])), ym(max(0.0, yt[0]))
                out.append(f'<rect x="{gx + i * bw}" y="{min(top, base):.1f}" width="{bw - 1}" '
                           f'height="{abs(base - top):.1f}" fill="{PALETTE[i % len(PALETTE)]}">'
                           f"<title>{escape(name)} · {escape(cat)}: {v:.2f}</title></rect>")
    return "\n".join(out + ["</svg>"])


def heatmap(matrix: list[list[float]], outlined: list[int], title: str, cell: int = 0) -> str:
    """A square matrix as coloured cells (white = min, dark blue = max; value in each cell's tooltip),
    rows/columns in ``outlined`` drawn with a red frame. Index ``i`` = row/column ``i``."""
    n = len(matrix)
    vals = [v for row in matrix for v in row if _finite(v)]
    if not n or not vals:
        return ""
    cell = cell or max(6, min(18, 420 // n))
    lo, hi = sorted(vals)[len(vals) // 10], max(vals)  # 10th percentile: an outlier row (embeddings) keeps contrast
    x0, y0 = 34, 30
    w, h = x0 + n * cell + 70, y0 + n * cell + 36
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           f'font-size="10" font-family="sans-serif">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>']
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            t = min(1.0, max(0.0, (v - lo) / ((hi - lo) or 1))) if _finite(v) else 0.0
            fill = f"rgb({int(255 - 224 * t)},{int(255 - 136 * t)},{int(255 - 75 * t)})" if _finite(v) else "#eee"
            out.append(f'<rect x="{x0 + j * cell}" y="{y0 + i * cell}" width="{cell}" height="{cell}" fill="{fill}">'
                       f"<title>({i}, {j}): {_fmt(v) if _finite(v) else 'n/a'}</title></rect>")
    step = max(1, n // 10)
    for i in range(0, n, step):
        c = y0 + i * cell + cell / 2
        out.append(f'<text x="{x0 - 3}" y="{c + 3:.1f}" text-anchor="end">{i}</text>'
                   f'<text x="{x0 + i * cell + cell / 2:.1f}" y="{y0 + n * cell + 12}" text-anchor="middle">{i}</text>')
    for i in outlined:
        if 0 <= i < n:
            out.append(f'<rect class="removed" x="{x0}" y="{y0 + i * cell}" width="{n * cell}" height="{cell}" '
                       f'fill="none" stroke="#d62728" stroke-width="1.5"/>'
                       f'<rect x="{x0 + i * cell}" y="{y0}" width="{cell}" height="{n * cell}" fill="none" '
                       f'stroke="#d62728" stroke-width="1.5"/>')
    lx = x0 + n * cell + 12
    out.append(f'<text x="{lx}" y="{y0 + 8}">{_fmt(hi)}</text><text x="{lx}" y="{y0 + n * cell}">≤{_fmt(lo)}</text>'
               f'<text x="{x0 + n * cell / 2}" y="{h - 4}" text-anchor="middle">layer input index '
               f'(red: removed)</text>')
    return "\n".join(out + ["</svg>"])


def html_table(header: list[str], rows: list[tuple[str, list[tuple[str, bool]], bool]]) -> str:
    """rows: (label, [(cell text, bold)], is_bad) -> an HTML table (bad rows highlighted)."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for label, cells, bad in rows:
        tds = "".join(f"<td>{'<b>' + escape(t) + '</b>' if b else escape(t)}</td>" for t, b in cells)
        out.append(f"<tr{' class=bad' if bad else ''}><td>{escape(label)}</td>{tds}</tr>")
    return "\n".join(out + ["</table>"])


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete self-contained HTML document; ``sections`` are (heading, inner html)."""
    body = "\n".join(f"<h2>{escape(h)}</h2>\n{inner}" for h, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n")
