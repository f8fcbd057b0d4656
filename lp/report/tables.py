"""Paper-style tables as frames: one block per (model, evaluation settings, n = removed layers).

Each block starts with the ``Dense`` row of the same model *and* evaluation settings (a dense result
evaluated differently is refused: listed, never shown beside the pruned rows), then every pruner in
sweep order followed by its patched rows (``patch != none``), each named after its kind's own method
(:func:`lp.report.vocab.patch_label`): ``+LinearPatch`` (``rotate``, the paper's), ``+lstsq``,
``+diag``, ..., ``+auto → lstsq`` (the kinds ``patch=auto`` chose in the row's runs). Rows that differ in a non-group setting (``calib.nsamples=4,16``,
``patch.hadamard=...``) are labelled with its values; rows that differ only in seed-like keys
(:data:`lp.report.vocab.SEED_KEYS`) are one row, ``mean`` with a ``<col> std`` column.

PPL: lower is better, ``Avg.`` = mean over the datasets (only with two or more). QA: scores x100,
``Avg`` = ``qa/avg`` (else the mean of the tasks; only with two or more tasks), ``RP`` = 100 * Avg /
Dense Avg of the block (else the run's ``qa/rp``), MMLU (x100) when present; higher is better.
Failed/missing jobs keep their row, with the status in the label and NaN values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from lp.methods import label as pruner_label
from lp.methods import prunes_width
from lp.report.caption import caption
from lp.report.vocab import (
    BLOCK_KEYS,
    CHOSEN,
    KEYS,
    NONE,
    PPL_SETS,
    RATIO,
    STD,
    TASK_NAMES,
    WARN_SEP,
    is_dense,
    is_seed_key,
    join_kinds,
    normalize,
    num,
    patch_label,
)


@dataclass
class Row:
    label: str
    status: str
    members: list[pd.Series]  # the runs averaged into this row (several: seeds)
    pruner: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass
class Block:
    title: str
    dense: pd.Series | None
    rows: list[Row]


def varying_keys(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(label keys, seed keys): config-path columns (dotted, or ``seed``) whose values differ between
    the pruned rows; model/eval/data keys and ``pruner.n`` excluded (they make blocks)."""
    pruned = df[~is_dense(df)]
    patched = pruned[~pruned["patch"].isin(NONE)] if "patch" in pruned else pruned

    def varies(c: str) -> bool:  # patch settings only count where a patch was applied
        rows = patched if c.startswith("patch.") else pruned
        return rows[c].dropna().astype(str).nunique() > 1

    keys = [c for c in df if ("." in c or c == "seed") and "/" not in c and not c.startswith(BLOCK_KEYS)
            and varies(c)]
    return [k for k in keys if not is_seed_key(k)], [k for k in keys if is_seed_key(k)]


def _short(keys: list[str]) -> dict[str, str]:
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _variant(r: pd.Series, keys: list[str]) -> tuple:
    """Values of ``keys`` for a row; patch settings do not apply to an unpatched row."""
    return tuple(None if (k.startswith("patch.") and r["patch"] in NONE) or pd.isna(r.get(k)) else str(r[k])
                 for k in keys)


def _label(name: str, patched: bool, alone: bool, patch: str, distill: str, variant: tuple, keys: list[str]) -> str:
    """``patch``: the patch's row name (:func:`lp.report.vocab.patch_label`)."""
    label = name
    if patched:  # "+LinearPatch" reads as "the row above, patched" - else name the selection too
        label = f"+{patch}" if not alone else f"{name} +{patch}"
    label += "" if distill in NONE else f" +{distill}"
    short = _short(keys)
    parts = [f"{short[k]}={v}" for k, v in zip(keys, variant, strict=True) if v is not None]
    return label + (f" ({', '.join(parts)})" if parts else "")


def _pruner_rows(g: pd.DataFrame, pruner: str, keys: list[str]) -> list[Row]:
    g = g.assign(_p=~g["patch"].isin(NONE), _d=~g["distill"].isin(NONE),
                 _v=[_variant(r, keys) for _, r in g.iterrows()])
    order = {v: i for i, v in enumerate(dict.fromkeys(g["_v"]))}
    g = g.assign(_o=g["_v"].map(order)).sort_values(["_p", "_d", "_o"], kind="stable")
    alone = not (~g["_p"]).any()
    rows: list[Row] = []
    for (patched, patch, distill, variant), grp in g.groupby(["_p", "patch", "distill", "_v"], sort=False):
        chosen = join_kinds(grp[CHOSEN]) if CHOSEN in grp else None  # patch=auto: what its runs chose
        label = f"job {grp['job'].iloc[0]}" if pruner == "?" else _label(
            pruner_label(pruner), patched, alone, patch_label(patch, chosen), distill, variant, keys)
        ok = [r for _, r in grp.iterrows() if r["status"] == "ok"]
        if ok:
            rows.append(Row(label, "ok", ok, pruner))
        rows += [Row(f"{label} ({r['status']})", r["status"], [r], pruner) for _, r in grp.iterrows()
                 if r["status"] != "ok"]
    for row in rows:
        row.warnings = [f"job {m['job']}: {w}" for m in row.members
                        if isinstance(m.get("warnings"), str) for w in m["warnings"].split(WARN_SEP) if w]
    return rows


def _eval_diff(df: pd.DataFrame, sig: str) -> str:
    """The evaluation settings that set rows of signature ``sig`` apart from the model's other rows."""
    cols = [c for c in df if c.startswith(("eval.", "model.")) or c in ("dtype", "ppl_windows")]
    mine, other = df[df["eval_settings"] == sig], df[df["eval_settings"] != sig]
    parts = [f"{c.split('.', 1)[-1]}={mine[c].iloc[0]}" for c in cols
             if mine[c].astype(str).nunique() == 1 and set(mine[c].astype(str)) != set(other[c].astype(str))]
    return ", ".join(parts) or f"eval settings {sig}"


def blocks(df: pd.DataFrame) -> tuple[list[Block], list[str]]:
    """The table blocks in paper order (see module doc) and the notes on refused dense results."""
    df = normalize(df)
    if "eval_settings" not in df:
        df["eval_settings"] = None
    first = df.groupby("model", sort=False)["eval_settings"].agg(lambda s: s.dropna().iloc[0] if s.notna().any()
                                                                 else "?")
    df["eval_settings"] = [s if isinstance(s, str) else first[m] for m, s in zip(df["model"], df["eval_settings"],
                                                                                 strict=True)]
    dense = is_dense(df)
    pruned = df[~dense]
    keys = list(dict.fromkeys(zip(pruned["model"], pruned["eval_settings"], pruned["n"], strict=True)))
    models, sigs = list(dict.fromkeys(df["model"])), list(dict.fromkeys(df["eval_settings"]))
    keys.sort(key=lambda k: (models.index(k[0]), sigs.index(k[1]), math.inf if pd.isna(k[2]) else k[2]))
    label_keys, _ = varying_keys(df)
    out, notes = [], []
    for model, sig, n in keys or [(m, s, 0) for m, s in dict.fromkeys(zip(df["model"], df["eval_settings"],
                                                                          strict=True))]:
        here = df[(df["model"] == model) & (df["eval_settings"] == sig)]
        d = here[dense.loc[here.index]].sort_values("status", key=lambda s: s != "ok", kind="stable")
        same_n = here["n"].isna() if pd.isna(n) else (here["n"] == n).fillna(False)
        sub = here[~dense.loc[here.index] & same_n]
        rows = [r for p in dict.fromkeys(sub["pruner"]) for r in _pruner_rows(sub[sub["pruner"] == p], p, label_keys)]
        labels = [(r.label, r.pruner) for r in rows]  # same label twice under one pruner: add the job number
        for r in rows:
            r.label += f" #{r.members[0]['job']}" if labels.count((r.label, r.pruner)) > 1 else ""
        title = f"{model}, n = {'?' if pd.isna(n) else n}" + (" (dense only)" if not len(sub) else "")
        if len(df[df["model"] == model]["eval_settings"].unique()) > 1:
            title += f" [{_eval_diff(df[df['model'] == model], sig)}]"
        out.append(Block(title, d.iloc[0] if len(d) else None, rows))
    for _, r in df[dense].iterrows():
        if keys and (r["model"], r["eval_settings"]) not in {(m, s) for m, s, _ in keys}:
            notes.append(f"Dense job {r['job']} ({r['model']}) not shown: its evaluation settings "
                         f"({_eval_diff(df[df['model'] == r['model']], r['eval_settings'])}) match no pruned row.")
    return out, notes


def _ratios_differ(df: pd.DataFrame) -> bool:
    """Whether the tables show :data:`RATIO`: a width-pruned row (:mod:`lp.methods`; LLM-Pruner: the
    paper's "Ratio" column) with a recorded ratio is present, or pruned rows of one (model, n) remove
    different parameter shares."""
    if "pruned_ratio_%" not in df:
        return False
    pr = normalize(df)
    pr = pr[~is_dense(pr) & pr["pruned_ratio_%"].notna()]
    if pr["pruner"].map(prunes_width).any():
        return True
    return bool((pr.groupby(["model", pr["n"].astype(str)])["pruned_ratio_%"].agg(
        lambda s: s.round(2).nunique()) > 1).any())


def _frame(df: pd.DataFrame, columns: dict[str, callable]) -> tuple[pd.DataFrame, list[str]]:
    """One frame row per table row: ``columns`` maps a name to ``f(run row, dense row or None)``;
    rows of several runs hold the mean and, in ``<name> std``, the sample standard deviation."""
    if _ratios_differ(df):
        columns = {RATIO: lambda r, _: num(r.get("pruned_ratio_%")), **columns}
    bl, notes = blocks(df)
    out, spread = [], False
    for b in bl:
        entries = [("Dense", b.dense["status"], [b.dense], [])] if b.dense is not None else []
        entries += [(r.label, r.status, r.members, r.warnings) for r in b.rows]
        for label, status, members, warns in entries:
            rec = {"block": b.title, "method": label, "status": status,
                   "job": ",".join(str(m["job"]) for m in members), "runs": len(members),
                   "warnings": WARN_SEP.join(warns) or None}
            for c, f in columns.items():
                vals = pd.Series([f(m, b.dense) for m in members], dtype=float)
                rec[c] = vals.mean(skipna=False)
                if len(members) > 1:
                    rec[c + STD], spread = vals.std(skipna=False), True
            out.append(rec)
    cols = [*KEYS, *(x for c in columns for x in ((c, c + STD) if spread else (c,)))]
    return pd.DataFrame(out, columns=cols), notes


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = PPL datasets (display names) + ``Avg.``. Empty if no PPL.
    ``.attrs["notes"]``: refused dense results."""
    sets = sorted((c for c in df if c.startswith("ppl/")), key=lambda c: (
        list(PPL_SETS).index(c[4:]) if c[4:] in PPL_SETS else 99, c))
    if not sets:
        return pd.DataFrame(columns=KEYS)
    cols = {PPL_SETS.get(c[4:], c[4:]): (lambda r, _, c=c: num(r.get(c))) for c in sets}
    if len(sets) > 1:
        cols["Avg."] = lambda r, _: sum(num(r.get(c)) for c in sets) / len(sets)  # nan if any is nan
    table, notes = _frame(df, cols)
    table.attrs["notes"] = notes
    return table


def qa_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = QA tasks (paper order, x100), ``Avg``, ``RP``, ``MMLU``."""
    tasks = [c for c in df if c.startswith("qa/") and c.endswith("/score")]
    order = list(dict.fromkeys(TASK_NAMES.values()))
    tasks.sort(key=lambda c: (order.index(TASK_NAMES[c[3:-6]]) if c[3:-6] in TASK_NAMES else 99, c))
    if not tasks and "mmlu/acc" not in df:
        return pd.DataFrame(columns=KEYS)

    def avg(r, _):
        given = num(r.get("qa/avg"))
        return 100 * (given if not math.isnan(given) else sum(num(r.get(c)) for c in tasks) / len(tasks))

    def rp(r, dense):
        if dense is not None and dense["status"] == "ok":
            return 100 * avg(r, None) / avg(dense, None)
        return num(r.get("qa/rp"))

    cols = {TASK_NAMES.get(c[3:-6], c[3:-6]): (lambda r, _, c=c: 100 * num(r.get(c))) for c in tasks}
    if len(tasks) > 1:
        cols["Avg"] = avg
    if tasks:
        cols["RP"] = rp
    if "mmlu/acc" in df:
        cols["MMLU"] = lambda r, _: 100 * num(r.get("mmlu/acc"))
    table, notes = _frame(df, cols)
    table.attrs["notes"] = notes
    return table


@dataclass
class Table:
    """One reported table: its frame, caption (settings), whether it is a smoke table (subset
    evaluation: nothing bolded) and notes (refused dense results, warnings of its rows)."""

    title: str
    frame: pd.DataFrame
    lower_is_better: bool
    caption: str
    smoke: bool
    notes: list[str]


def merge_jobs(warns: list[str]) -> list[str]:
    """``job <id>: <message>`` lines with one line per distinct message, its jobs listed in order of
    first appearance: ``jobs 1, 2: <message>``."""
    jobs: dict[str, list[str]] = {}
    for w in warns:
        job, sep, msg = w.partition(": ")
        job, msg = (job.removeprefix("job "), msg) if sep and job.startswith("job ") else ("", w)
        ids = jobs.setdefault(msg, [])
        if job and job not in ids:
            ids.append(job)
    return [f"job{'s' if len(ids) > 1 else ''} {', '.join(ids)}: {m}" if ids else m for m, ids in jobs.items()]


def report_tables(df: pd.DataFrame) -> list[Table]:
    """The non-empty PPL and QA tables of a summary frame."""
    out = []
    for title, section, build, lower in (("Perplexity (lower is better)", "ppl", ppl_table, True),
                                         ("Zero-shot QA accuracy x100 (higher is better)", "qa", qa_table, False)):
        frame = build(df)
        if len(frame):
            text, smoke = caption(df, section)
            warns = [w for ws in frame["warnings"].dropna() for w in ws.split(WARN_SEP)]
            out.append(Table(title, frame, lower, text, smoke, [*frame.attrs.get("notes", []),
                                                                  *(f"⚠ {w}" for w in merge_jobs(warns))]))
    return out
