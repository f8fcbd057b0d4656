"""Static HTML pieces of the dashboard (:mod:`lp.report.dashboard`): tables, chart grids, the page.

The page has no JavaScript and references nothing outside itself (charts are inline ``<svg>`` from
:mod:`lp.report.plots`), so it opens offline from disk.
"""

from __future__ import annotations

from html import escape

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}tr.bad td{background:#fff1f0;color:#a00}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.grid svg{border:1px solid #eee;background:#fff;max-width:100%;height:auto}
pre{white-space:pre-wrap;background:#f8f8f8;padding:6px;font-size:.85em;max-height:240px;overflow:auto}
.note{color:#666;font-size:.88em}.warn{color:#a00;font-weight:600}
"""


def html_table(header: list[str], rows: list[tuple[str, list[tuple[str, bool]], bool]]) -> str:
    """rows: (label, [(cell text, bold)], is_bad) -> an HTML table (bad rows highlighted)."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
    for label, cells, bad in rows:
        tds = "".join(f"<td>{'<b>' + escape(t) + '</b>' if b else escape(t)}</td>" for t, b in cells)
        out.append(f"<tr{' class=bad' if bad else ''}><td>{escape(label)}</td>{tds}</tr>")
    return "\n".join(out + ["</table>"])


def grid(charts: list[str]) -> str:
    """Inline SVG charts side by side, wrapping to the page width."""
    return '<div class="grid">' + "\n".join(charts) + "</div>"


def page(title: str, sections: list[tuple[str, str]]) -> str:
    """A complete self-contained HTML document; ``sections`` are (heading, inner html)."""
    body = "\n".join(f"<h2>{escape(h)}</h2>\n{inner}" for h, inner in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title>'
            f"<style>{_CSS}</style></head>\n<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n")
