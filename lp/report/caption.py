"""The settings caption under each table: model, dtype, calibration, PPL windows, QA limit and shots.

A setting that differs between rows is shown with all its values ("16 / 64"). Evaluation on a
subset (a QA ``limit``, a PPL ``max_windows``) makes the table a *smoke* table: the caption says so
loudly and no value is bolded, so it cannot pass for a final result.
"""

from __future__ import annotations

import pandas as pd

from lp.report.vocab import is_dense


def _values(df: pd.DataFrame, col: str) -> str | None:
    if col not in df:
        return None
    vals = [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in dict.fromkeys(df[col].dropna())]
    vals = list(dict.fromkeys(vals))
    return " / ".join(vals) if vals else None


def _int(v) -> str:
    try:
        return str(int(float(v)))
    except (TypeError, ValueError):
        return str(v)


def caption(df: pd.DataFrame, section: str) -> tuple[str, bool]:
    """(caption text, smoke) for the ``section`` ("ppl" or "qa") table of summary frame ``df``."""
    ok = df[df["status"] == "ok"]
    parts = [f"Model: {_values(ok, 'model') or '?'}" + (f" ({_values(ok, 'dtype')})" if _values(ok, "dtype") else "")]
    calib = ok[~is_dense(ok) & (ok["calibrated"] if "calibrated" in ok else True)]
    if len(calib) and _values(calib, "calib.nsamples"):
        parts.append(f"calibration: {_values(calib, 'calib.corpus')}/{_values(calib, 'calib.split')}, "
                     f"{_values(calib, 'calib.nsamples')} × {_values(calib, 'calib.seqlen')} tokens")
    smoke = []
    if section == "ppl" and _values(ok, "eval.ppl.seqlen"):
        windows = _values(ok, "ppl_windows") or "all"
        parts.append(f"PPL: {_values(ok, 'eval.ppl.split')} split, {windows} windows × "
                     f"{_values(ok, 'eval.ppl.seqlen')} tokens")
        if _values(ok, "eval.ppl.max_windows"):
            smoke.append(f"PPL on at most {_values(ok, 'eval.ppl.max_windows')} windows per dataset")
    if section == "qa":
        for name, key in (("QA", "eval.qa"), ("MMLU", "eval.mmlu")):
            if f"{key}.limit" not in ok and f"{key}.num_fewshot" not in ok:
                continue
            limit, shots = _values(ok, f"{key}.limit"), _values(ok, f"{key}.num_fewshot")
            parts.append(f"{name}: {_int(shots) + '-shot' if shots else 'protocol-default shots'}, "
                         + (f"limit {limit} examples per task" if limit else "full sets"))
            if limit:
                smoke.append(f"{name} on a SUBSET ({limit} examples per task)")
    text = "Settings: " + "; ".join(parts) + "."
    if smoke:
        text += (" ⚠ SMOKE SETTINGS: " + "; ".join(smoke)
                 + " — not comparable to full-set numbers; nothing bolded.")
    return text, bool(smoke)
