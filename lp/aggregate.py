"""Aggregate a Hydra multirun sweep into ``summary.csv``, ``table.md``, ``table.tex``, ``dashboard.html``.

    python -m lp.aggregate <sweep_dir> [--out DIR]

The pieces live in :mod:`lp.report` (loading, tables, markdown/LaTeX, dashboard); this module writes
them. Best value per column and block is bold, among *successful pruned* rows (Dense is the
reference and is never bolded); failed/missing jobs keep their row and are listed under Failures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lp.report import dashboard, render
from lp.report.results import NoResultsError, load_results, summarize
from lp.report.tables import ppl_table, qa_table, report_tables
from lp.report.vocab import normalize
from lp.tracking import sweep_group

__all__ = ["NoResultsError", "load_results", "main", "ppl_table", "qa_table", "summarize", "write_all"]
log = logging.getLogger(__name__)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: readers never see half a file
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(sweep_dir, out=None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.tex and dashboard.html into ``out`` (default: the sweep dir)."""
    results = load_results(sweep_dir)
    df = summarize(results)
    norm = normalize(df)
    tables = report_tables(norm)
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("summary_csv", "summary.csv"), ("table_md", "table.md"),
                                     ("table_tex", "table.tex"), ("dashboard", "dashboard.html"))}
    failures = df[df["status"] != "ok"]
    _write(paths["summary_csv"], df.to_csv(index=False))
    _write(paths["table_md"], render.markdown(tables, failures))
    _write(paths["table_tex"], render.latex(tables))
    _write(paths["dashboard"], dashboard.build(norm, results, tables, failures))
    return paths


def log_sweep(config, sweep_dir) -> None:
    """With a tracker configured (``tracker=wandb``): one more run in the sweep's group, job type
    ``aggregate``, holding ``summary.csv``, each table and the dashboard's charts and page."""
    if str(OmegaConf.select(config, "tracker._target_", default="")).endswith("NoneTracker"):
        return
    name = config.get("sweep_name")
    fill = {"group": sweep_group(name, sweep_dir), "job_type": "aggregate", "name": f"{name}/aggregate"}
    fill = {k: v for k, v in fill.items() if k in config.tracker and config.tracker[k] is None}
    tracker = instantiate(config.tracker, _partial_=True, _convert_="all", **fill)(dir=str(sweep_dir), config=None)
    status = "failed"
    try:
        records = load_results(sweep_dir)
        df = summarize(records)
        norm = normalize(df)
        tables = report_tables(norm)
        tracker.log_table("sweep/summary", *_rows(df))
        for t in tables:
            tracker.log_table(f"sweep/{t.title.split(' (')[0].lower().replace(' ', '_')}", *_rows(t.frame))
        for section, svgs in dashboard.charts(norm, records, tables).items():
            for i, svg in enumerate(svgs):
                tracker.log_html(f"dashboard/{section.split(' (')[0].lower().replace(' ', '_')}_{i}", svg)
        tracker.log_html("dashboard/page", dashboard.build(norm, records, tables, df[df["status"] != "ok"]))
        status = "ok"
    finally:
        tracker.finish(status)


def _rows(df) -> tuple[list[str], list[list]]:
    """Columns and rows of a frame for a tracker table: numbers stay numbers, NaN -> None, others str."""
    def cell(v):
        if isinstance(v, (bool, int, float)) and not (isinstance(v, float) and v != v):
            return v
        return None if v is None or (isinstance(v, float) and v != v) or v is pd.NA else str(v)

    return [str(c) for c in df.columns], [[cell(v) for v in row] for row in df.astype(object).values.tolist()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lp.aggregate", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="Hydra multirun dir holding <job_num>/result.json")
    ap.add_argument("--out", default=None, help="output dir (default: the sweep dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = write_all(args.sweep_dir, args.out)
    except NoResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
