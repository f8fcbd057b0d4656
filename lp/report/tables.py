"""Paper-style tables as frames: one block per (model, n = number of removed layers).

Each block starts with the ``Dense`` reference row, then every pruner in sweep order followed by its
``+LinearPatch`` row(s) (``patch != none``; the patch kind is appended when a pruner has several).
PPL: lower is better, ``Avg.`` = mean over the datasets shown. QA: scores x100, ``Avg`` = ``qa/avg``
(else the mean of the tasks shown), ``RP`` = ``qa/rp`` (else 100 * Avg / Dense Avg), MMLU (x100) as
an extra column when present; higher is better. Failed/missing jobs keep their row, with the status
in the label and NaN values.
"""

from __future__ import annotations

import math

import pandas as pd

from lp.report.vocab import KEYS, NONE, PPL_SETS, QA_TASKS, is_dense, normalize, num, pruner_label


def rows_by_block(df: pd.DataFrame) -> list[tuple[str, list[tuple[str, pd.Series]]]]:
    """[(block title, [(method label, summary row)])] in paper order (see module doc)."""
    df = normalize(df)
    dense, blocks = is_dense(df), []
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
            many, name = g.loc[g["_p"], "patch"].nunique() > 1, pruner_label(pruner)
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
           for t, rows in rows_by_block(df) for lab, r in rows]
    return pd.DataFrame(out, columns=[*KEYS, *columns])


def ppl_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = PPL datasets (display names) + ``Avg.``. Empty if no PPL."""
    sets = sorted((c for c in df if c.startswith("ppl/")), key=lambda c: (
        list(PPL_SETS).index(c[4:]) if c[4:] in PPL_SETS else 99, c))
    if not sets:
        return pd.DataFrame(columns=KEYS)
    cols = {PPL_SETS.get(c[4:], c[4:]): (lambda r, _, c=c: num(r.get(c))) for c in sets}
    cols["Avg."] = lambda r, _: sum(num(r.get(c)) for c in sets) / len(sets)  # nan if any is nan
    return _frame(df, cols)


def qa_table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = methods per block; columns = QA tasks (paper order, x100), ``Avg``, ``RP``, ``MMLU``."""
    tasks = [c for c in df if c.startswith("qa/") and c.endswith("/score")]
    order = list(dict.fromkeys(QA_TASKS.values()))
    tasks.sort(key=lambda c: (order.index(QA_TASKS[c[3:-6]]) if c[3:-6] in QA_TASKS else 99, c))
    if not tasks and "mmlu/acc" not in df:
        return pd.DataFrame(columns=KEYS)

    def avg(r, _):
        given = num(r.get("qa/avg"))
        return 100 * (given if not math.isnan(given) else sum(num(r.get(c)) for c in tasks) / len(tasks))

    def rp(r, rows):
        given = num(r.get("qa/rp"))
        ref = [avg(d, rows) for lab, d in rows if lab == "Dense" and d["status"] == "ok"]
        return given if not math.isnan(given) else (100 * avg(r, rows) / ref[0] if ref else math.nan)

    cols = {QA_TASKS.get(c[3:-6], c[3:-6]): (lambda r, _, c=c: 100 * num(r.get(c))) for c in tasks}
    if tasks:
        cols.update(Avg=avg, RP=rp)
    if "mmlu/acc" in df:
        cols["MMLU"] = lambda r, _: 100 * num(r.get("mmlu/acc"))
    return _frame(df, cols)
