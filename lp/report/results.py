"""Loading a sweep: ``<sweep_dir>/<job>/result.json`` files -> records -> one flat summary frame.

Only ``<job>/result.json`` is read (plus ``<job>/.hydra/overrides.yaml`` to name a job that crashed
before writing one). A corrupt result.json is warned about and listed as *failed*, a job dir
without one as *missing*; neither is ever dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd

from lp.bookkeeping import PROGRESS, is_bookkeeping
from lp.report.vocab import CHOSEN, WARN_SEP, n_of, parse_overrides

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


def load_paths(paths: list) -> list[dict]:
    """Records of any mix of ``result.json`` files, run dirs (holding one) and sweep dirs; job ids
    are prefixed with the argument's position when more than one path is given. A job resumed from
    another loaded job (its ``resumed_from`` is among them) is left out: one run counts once."""
    records = []
    for i, p in enumerate(map(Path, paths)):
        if p.is_file() or (p.is_dir() and (p / "result.json").is_file() and not any(_job_dirs(p)[1:])):
            f = p if p.is_file() else p / "result.json"
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                r = {"status": "failed", "error": f"corrupt result.json: {e}"}
            r.update(job=str(f.parent), job_num=f.parent.name)
            r.setdefault("status", "ok")
            r.setdefault("overrides", _overrides(f.parent))
            batch = [r]
        else:
            batch = load_results(p)
        for r in batch:
            r["job_num"] = f"{i}:{r['job_num']}" if len(paths) > 1 else r["job_num"]
        records += batch
    loaded = {str((Path(r["job"]) / "result.json").resolve()) for r in records}
    records = [r for r in records if str(r.get("resumed_from")) not in loaded]
    _fill_unknown(records)
    return records


# Settings every row carries as flat columns (dotted config paths): the table captions and the
# ablation labels read them; summary.csv shows them.
SETTINGS = ("seed", "calib.corpus", "calib.split", "calib.nsamples", "calib.seqlen", "patch.hadamard",
            "patch.hadamard_seed", "eval.ppl.split", "eval.ppl.seqlen", "eval.ppl.max_windows",
            "eval.qa.limit", "eval.qa.num_fewshot", "eval.mmlu.limit", "eval.mmlu.num_fewshot")
_NOT_EVAL = (PROGRESS, "batch_size", "dense_reference", "eval_dense", "device", "device_map",
             "generate", "base_model")  # a greedy sample and card metadata do not change the numbers


def model_name(r: dict) -> str:
    """A record's model as tables and charts name it: ``model.name`` (result, else config), else the
    config group choice."""
    return ((r.get("model") or {}).get("name") or setting(r, "model.name")
            or (r.get("choices") or {}).get("model") or "?")


def setting(r: dict, key: str):
    """Value of dotted config path ``key`` in a record's ``config`` (else its override string); lists
    are joined with commas, dicts give None (summary.csv holds flat values only)."""
    node, found = r.get("config") or {}, True
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            found = False
            break
        node = node[part]
    if not found:
        node = parse_overrides(r.get("overrides")).get(key)
    if isinstance(node, list):
        return ",".join(map(str, node))
    return None if isinstance(node, dict) else node


def eval_signature(r: dict) -> str | None:
    """Short hash of what the evaluated numbers depend on besides the pruning: the eval section, the
    model node and the data source (progress bars, batch sizes, devices excluded). None: no config."""
    cfg = r.get("config") or {}
    if "eval" not in cfg and "model" not in cfg:
        return None

    def strip(x):
        return {k: strip(v) for k, v in x.items() if k not in _NOT_EVAL} if isinstance(x, dict) else x

    key = {"eval": strip(cfg.get("eval")), "model": strip(cfg.get("model")),
           "data": (cfg.get("data") or {}).get("source")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def override_keys(results: list[dict]) -> list[str]:
    """Non-group keys set on the command line or by the sweep (e.g. ``calib.nsamples``, ``seed``),
    in first-seen order; groups (``pruner=...``) and bookkeeping keys (:mod:`lp.bookkeeping`) excluded."""
    keys = {}
    for r in results:
        groups = set(r.get("choices") or {})
        for k in parse_overrides(r.get("overrides")):
            if k not in groups and not is_bookkeeping(k):
                keys.setdefault(k, None)
    return list(keys)


def _flat(prefix: str, d: dict) -> dict:
    """Scalars of ``d`` (lists joined with spaces) under ``prefix + key``; nested dicts dropped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
            out[prefix + k] = " ".join(map(str, v))
        elif not isinstance(v, (dict, list)):
            out[prefix + k] = v
    return out


def chosen_kinds(r: dict) -> str | None:
    """The kinds ``patch=auto`` chose in a record (``patch.verification.choice``, one entry per cut),
    distinct in cut order and ``"/"``-joined, e.g. ``"lstsq/diag"``; None where it recorded no choice."""
    choice = (((r.get("patch") or {}).get("verification")) or {}).get("choice") or []
    return "/".join(dict.fromkeys(str(c["kind"]) for c in choice if isinstance(c, dict) and c.get("kind"))) or None


LEGACY = " [recorded without its uncertainty, before lp issue 26: may not be significant]"


def legacy_note(warning: str) -> str:
    """A held-out verification warning from before paired standard errors (no `±` in it) says so."""
    verification = (warning.startswith("patch=") and "WORSE than no patch" in warning) \
        or warning.startswith("selection check:")
    return warning + LEGACY if verification and " ± " not in warning and LEGACY not in warning else warning


def summarize(results: list[dict]) -> pd.DataFrame:
    """One row per job, flat columns only: status, error, every group choice, ``model`` (= model.name),
    n, removed layers, pruned ratio in percent, the :data:`SETTINGS` and every non-group override key
    (dotted config paths), pruning stats, metrics, timing, warnings, ``eval_settings`` (signature),
    ``patch_chosen`` (:func:`chosen_kinds`; only when a run recorded one)."""
    keys = [*SETTINGS, *(k for k in override_keys(results) if k not in SETTINGS)]
    rows = []
    for r in results:
        p = r.get("pruning") or {}
        row = {"job": r["job_num"], "status": r["status"], "error": r.get("error"),
               "name": r.get("name") or " ".join(r.get("overrides") or [])}
        row.update(r.get("choices") or {})
        row.update(model_config=row.get("model"), model=model_name(r),
                   dtype=(r.get("model") or {}).get("dtype") or setting(r, "model.dtype"))
        removed = p.get("removed_layers")
        row.update(n=n_of(r), removed_layers=" ".join(map(str, removed)) if removed else None)
        row[CHOSEN] = chosen_kinds(r)
        for k in ("pruned_ratio", "pruned_ratio_with_patch"):
            if isinstance(p.get(k), (int, float)):
                row[f"{k}_%"] = round(100 * p[k], 4)
        row.update(_flat("", {k: v for k, v in p.items() if k not in ("n", "removed_layers", "method")}))
        row.update({k: setting(r, k) for k in keys})
        windows = [v.get("windows") for k, v in ((r.get("data") or {}).items())
                   if k.startswith("ppl/") and isinstance(v, dict)]
        row["calibrated"] = bool((r.get("data") or {}).get("calibration"))
        row["ppl_windows"] = min((w for w in windows if isinstance(w, int)), default=None)
        row.update(_flat("", r.get("metrics") or {}))
        row.update(_flat("time/", r.get("timing") or {}))
        row.update(warnings=WARN_SEP.join(legacy_note(str(w)) for w in r.get("warnings") or []) or None,
                   eval_settings=eval_signature(r), overrides=" ".join(r.get("overrides") or []),
                   dir=r["job"], resumed_from=r.get("resumed_from"))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["n"] = df["n"].astype("Int64")
    unset = [k for k in (*keys, "dtype", "ppl_windows", CHOSEN) if df[k].isna().all()]  # e.g. no patch.hadamard
    return df.drop(columns=unset)
