"""Aggregate a Hydra multirun sweep into ``summary.csv``, ``table.md``, ``table.tex``, ``dashboard.html``.

    python -m lp.aggregate <sweep_dir> [--out DIR]

Only ``<sweep_dir>/<job>/result.json`` is read (plus ``<job>/.hydra/overrides.yaml`` to name a job
that crashed before writing one). A corrupt result.json is warned about and listed as *failed*, a job
dir without one as *missing*; neither is ever dropped.

Table layout (paper style): one block per (model, n = number of removed layers), the blocks stacked
vertically (a markdown sub-table / a LaTeX ``\\midrule`` block each). Each block starts with the
``Dense`` reference row, then every pruner in sweep order followed by its ``+LinearPatch`` row(s)
(``patch != none``; the patch kind is appended when a pruner has several). Best value per column and
block is bold, among *successful pruned* rows (Dense is the reference and is never bolded). PPL: 2
decimals, lower is better, ``Avg.`` = mean over the datasets shown. QA: scores x100, ``Avg`` =
``qa/avg`` (else the mean of the tasks shown), ``RP`` = ``qa/rp`` (else 100 * Avg / Dense Avg), MMLU
(x100) as an extra column when present; higher is better. Failed/missing jobs keep their row, with
the status in the label and ``—`` for absent values.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

PRUNERS = {"shortgpt": "ShortGPT", "llm_streamline": "LLM-Streamline", "streamline": "LLM-Streamline",
           "sleb": "SLEB", "taylor": "Taylor+", "blockpruner": "BlockPruner", "angular": "Angular (Gromov)",
           "linearpatch": "LinearPatch block",  # the paper's block selection; its patched row is "+LinearPatch"
           "lastn": "Last-n", "last_n": "Last-n", "random": "Random", "ppl": "PPL", "magnitude": "Magnitude"}
PPL_SETS = {"wikitext2": "WikiText2", "ptb": "PTB", "c4": "C4"}
QA_TASKS = {"wsc273": "WSC", "wsc": "WSC", "hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-e",
            "arc_challenge": "ARC-c", "boolq": "BoolQ", "winogrande": "WinoGrande", "race": "RACE",
            "copa": "COPA"}
DENSE, NONE = {"none", "dense"}, {None, "none", "null", ""}
KEYS = ("block", "method", "status", "job")  # non-value columns of ppl_table / qa_table


class NoResultsError(FileNotFoundError):
    """The sweep dir does not exist or holds no result.json at all."""


# ----------------------------------------------------------------------------------- loading
def _overrides(job: Path) -> list[str]:
    f = job / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    text = f.read_text(errors="replace")
    try:
        import yaml
        return [str(x) for x in yaml.safe_load(text) or []]
    except Exception:  # no pyyaml or odd file: the Hydra format is a plain "- item" list
        return [ln[2:].strip().strip("'\"") for ln in text.splitlines() if ln.startswith("- ")]


def _parse(overrides) -> dict[str, str]:
    return {k.lstrip("+~"): v for k, s, v in (o.partition("=") for o in overrides or []) if s}


def _fill_unknown(records: list[dict]) -> None:
    """Give jobs without ``choices`` (corrupt/missing) the choices their overrides imply: a group not
    overridden takes the sweep default, i.e. its value in any job that did not override it either."""
    defaults, n_default = {}, {}
    for r in records:
        ovr = _parse(r.get("overrides"))
        for k, v in (r.get("choices") or {}).items():
            if k not in ovr:
                defaults.setdefault(k, v)
        n = (r.get("pruning") or {}).get("n")
        if n is not None and "pruner.n" not in ovr:
            n_default.setdefault((r.get("choices") or {}).get("pruner"), n)
    for r in records:
        ovr = _parse(r.get("overrides"))
        if "choices" not in r:
            r["choices"] = {**defaults, **{k: v for k, v in ovr.items() if "." not in k and "/" not in k}}
        pruner = r["choices"].get("pruner")
        if (r.get("pruning") or {}).get("n") is None and "pruner.n" not in ovr and pruner in n_default:
            r["pruning"] = {**(r.get("pruning") or {}), "n": n_default[pruner]}


def _job_dirs(sweep: Path) -> list[Path]:
    dirs = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p.name.isdigit() or (p / "result.json").exists() or (p / ".hydra").is_dir())]
    dirs.sort(key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    return ([sweep] if (sweep / "result.json").exists() else []) + dirs


def load_results(sweep_dir) -> list[dict]:
    """One dict per job dir: the result.json content plus ``job`` (dir), ``job_num`` and ``status``."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise NoResultsError(f"sweep dir {sweep} does not exist")
    records = []
    for job in _job_dirs(sweep):
        f = job / "result.json"
        if not f.exists():
            r = {"status": "missing", "error": "no result.json (job crashed, was killed or still runs)"}
        else:
            try:
                r = json.loads(f.read_text())
                if not isinstance(r, dict):
                    raise ValueError("top level is not a JSON object")
            except (OSError, ValueError) as e:
                log.warning("corrupt result file %s: %s", f, e)
                r = {"status": "failed", "error": f"corrupt result.json: {e}"}
        r.update(job=str(job), job_num=job.name if job != sweep else ".")
        r.setdefault("status", "ok")
        r.setdefault("overrides", _overrides(job))
        records.append(r)
    if all(r["status"] == "missing" for r in records):
        raise NoResultsError(f"no result.json under sweep dir {sweep} ({len(records)} job dirs found)")
    _fill_unknown(records)
    return records


def _n_of(r: dict):
    n = (r.get("pruning") or {}).get("n")
    if n is None:
        n = _parse(r.get("overrides")).get("pruner.n")
    if n is None:
        n = ((r.get("config") or {}).get("pruner") or {}).get("n")
    if n is None and (r.get("choices") or {}).get("pruner") in DENSE:
        n = 0
    try:
        return int(n)
    except (TypeError, ValueError):
        return None


def summarize(results: list[dict]) -> pd.DataFrame:
    """One row per job: status, error, every choice, n, removed layers, pruning stats, metrics, timing."""
    rows = []
    for r in results:
        p = r.get("pruning") or {}
        row = {"job": r["job_num"], "status": r["status"], "error": r.get("error"),
               "name": r.get("name") or " ".join(r.get("overrides") or [])}
        row.update(r.get("choices") or {})
        removed = p.get("removed_layers")
        row.update(n=_n_of(r), removed_layers=" ".join(map(str, removed)) if removed else None)
        row.update({k: v for k, v in p.items() if k not in ("n", "removed_layers", "method", "scores")})
        row.update(r.get("metrics") or {})
        row.update({f"time/{k}": v for k, v in (r.get("timing") or {}).items()})
        row.update(overrides=" ".join(r.get("overrides") or []), dir=r["job"])
        rows.append(row)
    df = pd.DataFrame(rows)
    df["n"] = df["n"].astype("Int64")
    return df


# ------------------------------------------------------------------------------------ tables
def _norm(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for c, fill in (("model", "?"), ("pruner", "?"), ("patch", "none"), ("distill", "none")):
        df[c] = df[c].astype(object).where(df[c].notna(), fill) if c in df else fill
    return df


def _is_dense(df: pd.DataFrame) -> pd.Series:
    return df["pruner"].isin(DENSE) | ((df["n"] == 0).fillna(False) & (df["status"] == "ok"))


def _rows_by_block(df: pd.DataFrame) -> list[tuple[str, list[tuple[str, pd.Series]]]]:
    """[(block title, [(method label, summary row)])] in paper order (see module doc)."""
    df = _norm(df)
    dense, blocks = _is_dense(df), []
    keys = list(dict.fromkeys(zip(df.loc[~dense, "model"], df.loc[~dense, "n"], strict=True)))
    models = list(dict.fromkeys(df["model"]))  # models in sweep order, then n ascending
    keys.sort(key=lambda k: (models.index(k[0]), math.inf if pd.isna(k[1]) else k[1]))
    keys = keys or [(m, 0) for m in dict.fromkeys(df["model"])]
    for model, n in keys:
        rows = [("Dense", r, "") for _, r in df[dense & (df["model"] == model)].iterrows()]
        same_n = df["n"].isna() if pd.isna(n) else (df["n"] == n).fillna(False)
        sub = df[~dense & (df["model"] == model) & same_n]
        for pruner in dict.fromkeys(sub["pruner"]):
            g = sub[sub["pruner"] == pruner]
            g = g.assign(_p=~g["patch"].isin(NONE), _d=~g["distill"].isin(NONE)).sort_values(
                ["_p", "_d"], kind="stable")
            many, name = g.loc[g["_p"], "patch"].nunique() > 1, PRUNERS.get(pruner, pruner)
            for _, r in g.iterrows():
                if pruner == "?":
                    label = f"job {r['job']}"
                elif r["_p"]:  # "+LinearPatch" reads as "the row above, patched" - else name it
                    label = ("+LinearPatch" if (~g["_p"]).any() else f"{name} +LinearPatch") + (
                        f" ({r['patch']})" if many else "")
                else:
                    label = name
                label += f" +{r['distill']}" if r["_d"] else ""
                rows.append((label + ("" if r["status"] == "ok" else f" ({r['status']})"), r, pruner))
        seen = [(lab, p) for lab, _, p in rows]  # same label twice under one pruner: add the job number
        rows = [(f"{lab} #{r['job']}" if seen.count((lab, p)) > 1 else lab, r) for lab, r, p in rows]
        title = f"{model}, n = {'?' if pd.isna(n) else n}" + (" (dense only)" if not len(sub) else "")
        blocks.append((title, rows))
    return blocks


def _frame(df, columns: dict[str, callable]) -> pd.DataFrame:
    out = [{"block": t, "method": lab, "status": r["status"], "job": r["job"],
            **{c: f(r, rows) for c, f in columns.items()}}
           for t, rows in _rows_by_block(df) for lab, r in rows]
    return pd.DataFrame(out, columns=[*KEYS, *columns])


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = PPL datasets (display names) + ``Avg.``. Empty if no PPL."""
    sets = sorted((c for c in df if c.startswith("ppl/")), key=lambda c: (
        list(PPL_SETS).index(c[4:]) if c[4:] in PPL_SETS else 99, c))
    if not sets:
        return pd.DataFrame(columns=KEYS)
    cols = {PPL_SETS.get(c[4:], c[4:]): (lambda r, _, c=c: _num(r.get(c))) for c in sets}
    cols["Avg."] = lambda r, _: sum(_num(r.get(c)) for c in sets) / len(sets)  # nan if any is nan
    return _frame(df, cols)


def qa_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = QA tasks (paper order, x100), ``Avg``, ``RP``, ``MMLU``."""
    tasks = [c for c in df if c.startswith("qa/") and c.endswith("/score")]
    order = list(dict.fromkeys(QA_TASKS.values()))
    tasks.sort(key=lambda c: (order.index(QA_TASKS[c[3:-6]]) if c[3:-6] in QA_TASKS else 99, c))
    if not tasks and "mmlu/acc" not in df:
        return pd.DataFrame(columns=KEYS)

    def avg(r, _):
        given = _num(r.get("qa/avg"))
        return 100 * (given if not math.isnan(given) else sum(_num(r.get(c)) for c in tasks) / len(tasks))

    def rp(r, rows):
        given = _num(r.get("qa/rp"))
        ref = [avg(d, rows) for lab, d in rows if lab == "Dense" and d["status"] == "ok"]
        return given if not math.isnan(given) else (100 * avg(r, rows) / ref[0] if ref else math.nan)

    cols = {QA_TASKS.get(c[3:-6], c[3:-6]): (lambda r, _, c=c: 100 * _num(r.get(c))) for c in tasks}
    if tasks:
        cols.update(Avg=avg, RP=rp)
    if "mmlu/acc" in df:
        cols["MMLU"] = lambda r, _: 100 * _num(r.get("mmlu/acc"))
    return _frame(df, cols)


def _cells(table: pd.DataFrame, lower_is_better: bool):
    """[(block, header, [(label, [(text, bold)], bad)])]: 2-decimal text, best per block+column bold."""
    cols = [c for c in table if c not in KEYS]
    out = []
    for block, g in table.groupby("block", sort=False):
        cand = g[(g["status"] == "ok") & (g["method"] != "Dense")]
        best = {c: (cand[c].round(2).min() if lower_is_better else cand[c].round(2).max()) for c in cols}
        rows = [(r["method"], [("—", False) if pd.isna(r[c]) else
                               (f"{r[c]:.2f}", r["status"] == "ok" and r["method"] != "Dense"
                                and round(r[c], 2) == best[c]) for c in cols], r["status"] != "ok")
                for _, r in g.iterrows()]
        out.append((block, ["Method", *cols], rows))
    return out


_NOTE = "Bold: best successful pruned row per block. —: not available (failed/missing: see Failures)."


def _markdown(tables, failures: pd.DataFrame) -> str:
    lines = ["# Sweep results", ""]
    for title, table, lower in tables:
        lines += [f"## {title}", ""]
        for block, header, rows in _cells(table, lower):
            lines += [f"### {block}", "", "| " + " | ".join(header) + " |",
                      "|---|" + "---:|" * (len(header) - 1)]
            lines += ["| " + " | ".join([lab] + [f"**{t}**" if b else t for t, b in cells]) + " |"
                      for lab, cells, _ in rows]
            lines.append("")
        lines += [_NOTE, ""]
    lines += ["## Failures", ""] + ([f"- job {r.job} ({r.status}): `{r['name']}` — {r.error}"
                                     for _, r in failures.iterrows()] or ["None."])
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "—": "--"}


def _tex_escape(s) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _latex(tables) -> str:
    out = ["% generated by lp.aggregate -- needs \\usepackage{booktabs}"]
    for title, table, lower in tables:
        blocks = _cells(table, lower)
        header = blocks[0][1]
        out += [r"\begin{table}[t]", r"\centering", r"\small",
                rf"\caption{{{_tex_escape(title)}}}", rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}",
                r"\toprule", " & ".join(map(_tex_escape, header)) + r" \\"]
        for block, _, rows in blocks:
            out += [r"\midrule", rf"\multicolumn{{{len(header)}}}{{l}}{{\textit{{{_tex_escape(block)}}}}} \\"]
            out += [" & ".join([_tex_escape(lab)] + [rf"\textbf{{{t}}}" if b else _tex_escape(t)
                                                     for t, b in cells]) + r" \\" for lab, cells, _ in rows]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------- api
def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: readers never see half a file
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_all(sweep_dir, out=None) -> dict[str, Path]:
    """Write summary.csv, table.md, table.tex and dashboard.html into ``out`` (default: the sweep dir)."""
    results = load_results(sweep_dir)
    df = summarize(results)
    norm = _norm(df)
    tables = [(t, tab, low) for t, tab, low in (
        ("Perplexity (lower is better)", ppl_table(norm), True),
        ("Zero-shot QA accuracy x100 (higher is better)", qa_table(norm), False)) if len(tab)]
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("summary_csv", "summary.csv"), ("table_md", "table.md"),
                                     ("table_tex", "table.tex"), ("dashboard", "dashboard.html"))}
    failures = df[df["status"] != "ok"]
    _write(paths["summary_csv"], df.to_csv(index=False))
    _write(paths["table_md"], _markdown(tables, failures))
    _write(paths["table_tex"], _latex(tables))
    from lp import dashboard  # imports this module: keep the import here

    _write(paths["dashboard"], dashboard.build(norm, results, tables, failures))
    return paths


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
