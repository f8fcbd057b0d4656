"""Loading a sweep: ``<sweep_dir>/<job>/result.json`` files -> records -> one flat summary frame.

Only ``<job>/result.json`` is read (plus ``<job>/.hydra/overrides.yaml`` to name a job that crashed
before writing one). A corrupt result.json is warned about and listed as *failed*, a job dir
without one as *missing*; neither is ever dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from lp.report.vocab import n_of, parse_overrides

log = logging.getLogger(__name__)


class NoResultsError(FileNotFoundError):
    """The sweep dir does not exist or holds no result.json at all."""


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


def _fill_unknown(records: list[dict]) -> None:
    """Give jobs without ``choices`` (corrupt/missing) the choices their overrides imply: a group not
    overridden takes the sweep default, i.e. its value in any job that did not override it either."""
    defaults, n_default = {}, {}
    for r in records:
        ovr = parse_overrides(r.get("overrides"))
        for k, v in (r.get("choices") or {}).items():
            if k not in ovr:
                defaults.setdefault(k, v)
        n = (r.get("pruning") or {}).get("n")
        if n is not None and "pruner.n" not in ovr:
            n_default.setdefault((r.get("choices") or {}).get("pruner"), n)
    for r in records:
        ovr = parse_overrides(r.get("overrides"))
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


def summarize(results: list[dict]) -> pd.DataFrame:
    """One row per job: status, error, every choice, n, removed layers, pruning stats, metrics, timing."""
    rows = []
    for r in results:
        p = r.get("pruning") or {}
        row = {"job": r["job_num"], "status": r["status"], "error": r.get("error"),
               "name": r.get("name") or " ".join(r.get("overrides") or [])}
        row.update(r.get("choices") or {})
        removed = p.get("removed_layers")
        row.update(n=n_of(r), removed_layers=" ".join(map(str, removed)) if removed else None)
        row.update({k: v for k, v in p.items() if k not in ("n", "removed_layers", "method", "scores")})
        row.update(r.get("metrics") or {})
        row.update({f"time/{k}": v for k, v in (r.get("timing") or {}).items()})
        row.update(overrides=" ".join(r.get("overrides") or []), dir=r["job"])
        rows.append(row)
    df = pd.DataFrame(rows)
    df["n"] = df["n"].astype("Int64")
    return df
