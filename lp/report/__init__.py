"""Reports: a sweep (or any set of result.json files) -> summary.csv, table.md/.tex, dashboard.html.

Modules, each importing only the ones above it:

* :mod:`lp.report.vocab`   -- the reporting vocabulary: display labels, dense/n helpers, table cells.
* :mod:`lp.report.results` -- loading result.json files into records and a flat summary frame.
* :mod:`lp.report.tables`  -- paper-style PPL / QA tables (blocks, Dense rows, method labels).
* :mod:`lp.report.render`  -- markdown and LaTeX text of those tables.
* :mod:`lp.report.plots`   -- the dashboard's charts (matplotlib, inline SVG).
* :mod:`lp.report.html`    -- HTML pieces of the dashboard: tables, chart grid, the page.
* :mod:`lp.report.dashboard` -- the single-file offline dashboard page.

:mod:`lp.aggregate` (``python -m lp.aggregate``) writes all of them for a sweep dir.
"""
