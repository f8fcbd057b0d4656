"""Command line of the report tools (runs and sweeps themselves go through ``run.py``).

    python -m lp compare RUN_OR_SWEEP [RUN_OR_SWEEP ...] [--format md|tex|csv]
    python -m lp aggregate SWEEP_DIR [--out DIR]

``compare`` prints the paper-style tables (with Dense rows, captions and notes) of any set of
``result.json`` files, run dirs and sweep dirs, writing nothing. ``aggregate`` writes
``summary.csv``, ``table.md``, ``table.tex`` and ``dashboard.html`` of one sweep (as at the end of
every sweep).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lp import aggregate
from lp.report import render
from lp.report.results import NoResultsError, load_paths, summarize
from lp.report.tables import report_tables
from lp.report.vocab import normalize


def compare(paths: list[str], fmt: str = "md") -> str:
    """The text ``python -m lp compare`` prints."""
    records = load_paths(paths)
    df = summarize(records)
    if fmt == "csv":
        return df.to_csv(index=False)
    tables = report_tables(normalize(df))
    if not tables:
        raise NoResultsError(f"no PPL or QA metrics in {', '.join(map(str, paths))}")
    if fmt == "tex":
        return render.latex(tables)
    return render.markdown(tables, df[df["status"] != "ok"], title="Comparison")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lp", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="print the tables of result.json files, run dirs and sweep dirs")
    c.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP")
    c.add_argument("--format", choices=("md", "tex", "csv"), default="md")
    a = sub.add_parser("aggregate", help="write summary.csv, table.md/.tex and dashboard.html of a sweep")
    a.add_argument("sweep_dir")
    a.add_argument("--out", default=None, help="output dir (default: the sweep dir)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "aggregate":
        return aggregate.main([args.sweep_dir] + (["--out", args.out] if args.out else []))
    try:
        sys.stdout.write(compare(args.paths, args.format))
    except (NoResultsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
