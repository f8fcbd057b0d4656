"""Zero-shot QA and MMLU evaluation through EleutherAI lm-eval, in the paper's protocol.

Conventions
-----------
* QA protocol: the paper's nine tasks of :data:`PAPER_QA_TASKS`, zero-shot; lp evaluates
  the QA tasks of :data:`QA_TASKS` (the nine, or more). The paper metric of a task is
  :data:`PAPER_METRIC` (``acc_norm`` for ARC-e/ARC-c/HellaSwag/PIQA, ``acc`` otherwise).
  Scores are fractions in [0, 1], exactly as lm-eval reports them.
* ``qa/avg`` is the plain mean of the paper metrics of the QA tasks *that were
  evaluated* (``info["avg_tasks"]`` lists them; it equals the paper's Avg only when they
  are exactly the nine, see ``info["avg_complete"]`` and :func:`avg_complete`).
* RP (retained performance) = mean over tasks of (pruned / dense) * 100.
* MMLU: 5-shot (``dev`` split, lm-eval's prompt), micro-averaged over all questions
  (lm-eval's size-weighted ``mmlu`` group), reported as ``mmlu/acc`` and kept out of
  ``qa/avg``. ``limit`` applies per lm-eval task, i.e. per MMLU subject.
* ``num_fewshot=None`` means the protocol's default per task (0 for QA, 5 for MMLU);
  an integer overrides every task.

Offline data (``data_dir`` given, layout of ``shared/data``): for each task, the
overlay ``tasks/<task>.yaml`` names the built-in lm-eval config (``base``, relative to
``lm_eval/tasks``) and the local jsonl files. The built-in config is loaded with
lm-eval's own YAML loader (so ``include`` and ``!function`` resolve as usual) and only
its data source is replaced (``dataset_path: json`` + ``dataset_kwargs.data_files``;
splits without a local file are switched off). Prompts, choices, ``process_docs`` and
metrics stay lm-eval's. The resulting config dicts go to a
``TaskManager(include_defaults=False)``, so the built-in index is never scanned. MMLU's
local files hold all 57 subjects; each built-in per-subject config gets the rows whose
``subject`` equals its ``dataset_name`` (a ``process_docs``, which lm-eval applies to
the test and the few-shot ``dev`` docs alike; the built-in MMLU configs have none). With
``data_dir=None`` the built-in Hub tasks are used unchanged (online path). Offline
copies of most QA tasks hold only the evaluation split, so few-shot QA offline would
draw its examples from that same split: use ``num_fewshot`` > 0 only for ARC and MMLU.

Uses lm-eval's task API of 0.4.13 (``TaskManager.load``, ``Group``, the YAML loader).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from pathlib import Path
from typing import Any

import yaml

# The paper's QA protocol (Tables 3-4): its Avg is the mean over exactly these nine (`avg_complete`).
PAPER_QA_TASKS: tuple[str, ...] = (
    "wsc273", "hellaswag", "piqa", "arc_easy", "arc_challenge",
    "boolq", "winogrande", "race", "copa",
)
# Every QA task lp evaluates (each needs an overlay in tasks/ and a PAPER_METRIC); adding one here
# changes no run's `avg_complete`.
QA_TASKS: tuple[str, ...] = PAPER_QA_TASKS
PAPER_METRIC: dict[str, str] = {
    t: "acc_norm" if t in ("arc_challenge", "arc_easy", "hellaswag", "piqa") else "acc"
    for t in QA_TASKS
}
MMLU = "mmlu"
SUPPORTED_TASKS: tuple[str, ...] = QA_TASKS + (MMLU,)
DEFAULT_FEWSHOT: dict[str, int] = {MMLU: 5}  # every other task: 0
OVERLAY_DIR = Path(__file__).with_name("tasks")
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


# ----------------------------------------------------------------- task configs
def validate_tasks(tasks: list[str]) -> list[str]:
    """Return ``tasks`` de-duplicated, or raise ValueError naming the supported tasks."""
    if not tasks:
        raise ValueError(f"no task given; supported tasks: {', '.join(SUPPORTED_TASKS)}")
    for t in tasks:
        if t not in SUPPORTED_TASKS:
            near = difflib.get_close_matches(t, SUPPORTED_TASKS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"unknown task {t!r}.{hint} Supported tasks: {', '.join(SUPPORTED_TASKS)}"
            )
    return list(dict.fromkeys(tasks))


def _overlay(task: str) -> dict[str, Any]:
    with open(OVERLAY_DIR / f"{task}.yaml") as fh:
        return yaml.safe_load(fh)


def _local_files(task: str, data_dir: str | os.PathLike) -> dict[str, str]:
    """Split -> absolute path of the task's local files; FileNotFoundError if one is missing."""
    files = {s: Path(data_dir) / p for s, p in _overlay(task)["data_files"].items()}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"local data file for task {task!r} not found: expected {path}"
            )
    return {s: str(p) for s, p in files.items()}


def check_tasks(tasks: list[str], data_dir: str | os.PathLike | None) -> list[str]:
    """Validate task names and, with a local mirror, that every file exists (cheap, before any model loads)."""
    tasks = validate_tasks(list(tasks))
    if data_dir is not None:
        for t in tasks:
            _local_files(t, data_dir)
    return tasks


def _builtin_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _builtin(path: str | Path) -> dict[str, Any]:
    """A built-in lm-eval task config (path relative to lm_eval/tasks), fully resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_builtin_dir() / path, resolve_func=True)


def _offline(cfg: dict[str, Any], files: dict[str, str], **source: Any) -> dict[str, Any]:
    """Built-in config ``cfg`` with its data source swapped for local ``files``."""
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group")}
    for key in _SPLIT_KEYS:
        if cfg.get(key) is not None and cfg[key] not in files:
            cfg[key] = None
    cfg.update(dataset_path="json", dataset_name=None, **source)
    return cfg


def _subject_docs(dataset, *, subject: str):
    """``process_docs`` of an offline MMLU subject: its rows of the all-subject file."""
    subjects = dataset.with_format("arrow")["subject"].to_pylist()
    return dataset.select([i for i, s in enumerate(subjects) if s == subject])


def _mmlu_group(tm, files: dict[str, str]):
    """lm-eval ``mmlu`` Group of the 57 built-in subject configs, offline."""
    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig

    base = _builtin_dir() / _overlay(MMLU)["base"]
    configs = []
    for path in sorted(base.glob("mmlu_*.yaml")):
        cfg = _builtin(path)
        if cfg.get("process_docs") is not None:  # ours would silently replace it
            raise RuntimeError(f"{path} has a process_docs; the offline MMLU overlay needs updating")
        subject = functools.partial(_subject_docs, subject=cfg["dataset_name"])
        configs.append(_offline(cfg, files, dataset_kwargs={"data_files": files},
                               process_docs=subject))
    builtin = _builtin(base / "_mmlu.yaml")
    group = Group.from_config(GroupConfig(
        group=MMLU,
        aggregate_metric_list=builtin["aggregate_metric_list"],
        metadata=builtin.get("metadata"),
    ))
    for task in tm.load(configs)["tasks"].values():
        group.add(task)
    return group


def load_tasks(tasks: list[str], *, data_dir: str | os.PathLike | None, num_fewshot: int | None = None):
    """Build the lm-eval tasks (datasets loaded) -> (top-level Task/Group objects, TaskManager).

    With ``data_dir``, every local file is checked first (FileNotFoundError naming the
    expected path), before anything is loaded. Each leaf task's ``num_fewshot`` is set
    to the given value, else to the protocol default.
    """
    from lm_eval.tasks import TaskManager

    tasks = validate_tasks(tasks)
    if data_dir is None:
        tm = TaskManager()
        loaded = tm.load(tasks)
        top = {t: loaded["groups"][t] if t == MMLU else loaded["tasks"][t] for t in tasks}
    else:
        files = {t: _local_files(t, data_dir) for t in tasks}
        tm = TaskManager(include_defaults=False)
        top = {}
        for t in tasks:
            if t == MMLU:
                top[t] = _mmlu_group(tm, files[t])
            else:
                cfg = _offline(_builtin(_overlay(t)["base"]), files[t],
                               dataset_kwargs={"data_files": files[t]})
                top[t] = tm.load([cfg])["tasks"][t]
    for t, obj in top.items():
        shots = DEFAULT_FEWSHOT.get(t, 0) if num_fewshot is None else num_fewshot
        for leaf in obj.get_all_tasks() if t == MMLU else [obj]:
            leaf.set_config(key="num_fewshot", value=shots)
    return list(top.values()), tm


# ----------------------------------------------------------------- evaluation
def _hflm(model, tokenizer, batch_size: int | str, progress: bool):
    """lm-eval's HFLM around the in-memory model; ``progress=False`` hides its tqdm bars.
    ``batch_size``: an integer, or ``"auto"`` / ``"auto:N"`` (lm-eval finds the largest that fits,
    from 64 down on out-of-memory); the sizes it found are kept in ``.detected``."""
    from lm_eval.models.huggingface import HFLM

    class LpHFLM(HFLM):
        detected: list[int]

        def _detect_batch_size(self, requests=None, pos: int = 0):
            size = super()._detect_batch_size(requests, pos)
            self.detected.append(int(size))
            return size

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    lm = LpHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.detected = []
    return lm


def _num(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: str | os.PathLike | None,
    limit: int | float | None,
    batch_size: int | str,
    num_fewshot: int | None = None,
    device=None,
    progress: bool = True,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Evaluate an in-memory HF causal LM with lm-eval's ``simple_evaluate``.

    Returns ``(metrics, info)``. ``metrics`` is flat: ``qa/<task>/{acc, acc_stderr,
    acc_norm, acc_norm_stderr, score}`` (``None`` where lm-eval has no such metric;
    ``score`` is the paper metric), ``qa/avg`` (mean paper metric over the evaluated QA
    tasks) and ``mmlu/{acc, acc_stderr}``. ``info`` holds the lm-eval version, task
    versions, n-shot, sample counts per task, ``limit`` and the tasks in ``qa/avg``.
    ``device``: lm-eval runs an in-memory model where it lies; if given, the model is
    moved there first. ``progress=False`` hides the model's tqdm bars (lm-eval's own
    logging is left to the caller's logging config).
    """
    import lm_eval

    tasks = validate_tasks(tasks)
    if device is not None:
        model = model.to(device)
    top, tm = load_tasks(tasks, data_dir=data_dir, num_fewshot=num_fewshot)
    lm = _hflm(model, tokenizer, batch_size, progress)
    out = lm_eval.simple_evaluate(model=lm, tasks=top, task_manager=tm, limit=limit, log_samples=False)
    res = out["results"]
    metrics: dict[str, float | None] = {}
    for t in tasks:
        r = res[t]
        if t == MMLU:
            metrics["mmlu/acc"] = _num(r.get("acc,none"))
            metrics["mmlu/acc_stderr"] = _num(r.get("acc_stderr,none"))
            continue
        for m in ("acc", "acc_norm"):
            metrics[f"qa/{t}/{m}"] = _num(r.get(f"{m},none"))
            metrics[f"qa/{t}/{m}_stderr"] = _num(r.get(f"{m}_stderr,none"))
        metrics[f"qa/{t}/score"] = metrics[f"qa/{t}/{PAPER_METRIC[t]}"]
    qa = [t for t in tasks if t in QA_TASKS]
    if qa:
        metrics["qa/avg"] = average({t: metrics[f"qa/{t}/score"] for t in qa})

    def n_samples(name: str) -> dict[str, int]:
        if name in out.get("n-samples", {}):
            return dict(out["n-samples"][name])
        subs = [out["n-samples"][s] for s in out.get("group_subtasks", {}).get(name, [])]
        return {k: sum(s[k] for s in subs) for k in ("original", "effective")}

    info = {
        "lm_eval_version": lm_eval.__version__,
        "task_versions": {t: out["versions"].get(t) for t in tasks},
        "n_shot": {t: out["n-shot"].get(t) for t in tasks},
        "n_samples": {t: n_samples(t) for t in tasks},
        "limit": limit,
        "data_dir": None if data_dir is None else str(data_dir),
        "avg_tasks": qa,
        "avg_complete": avg_complete(qa),
        "batch_size": {"setting": batch_size, "detected": lm.detected},  # detected: sizes lm-eval found (auto)
    }
    return metrics, info


# ----------------------------------------------------------------- aggregates
def avg_complete(tasks) -> bool:
    """Whether the mean over the QA ``tasks`` is the paper's Avg: they are exactly :data:`PAPER_QA_TASKS`
    (another supported QA task among them makes it a different average)."""
    return set(tasks) == set(PAPER_QA_TASKS)


def average(scores: dict[str, float]) -> float:
    """Plain mean of per-task scores (the paper's Avg when all nine QA tasks are given)."""
    if not scores:
        raise ValueError("average of no scores")
    if any(v is None for v in scores.values()):
        raise ValueError(f"missing scores: {[t for t, v in scores.items() if v is None]}")
    return sum(scores.values()) / len(scores)


def retained_performance(scores: dict[str, float], dense: dict[str, float]) -> float:
    """RP = mean over tasks of (pruned score / dense score) * 100; task sets must match."""
    if set(scores) != set(dense):
        raise ValueError(
            f"task sets differ: only pruned {sorted(set(scores) - set(dense))}, "
            f"only dense {sorted(set(dense) - set(scores))}"
        )
    if not scores:
        raise ValueError("retained performance of no tasks")
    if any(not dense[t] for t in dense):
        raise ValueError(f"dense score is zero or missing: {dense}")
    return sum(scores[t] / dense[t] for t in scores) / len(scores) * 100.0


def paper_scores(metrics: dict[str, Any], tasks: list[str] | None = None) -> dict[str, float]:
    """``{task: metrics['qa/<task>/score']}`` for ``tasks`` (default: all QA tasks present)."""
    tasks = [t for t in QA_TASKS if f"qa/{t}/score" in metrics] if tasks is None else tasks
    return {t: metrics[f"qa/{t}/score"] for t in tasks}


def _score_key(task: str) -> str:
    return "mmlu/acc" if task == MMLU else f"qa/{task}/score"


def check_dense_reference(result: dict, *, model_name: str, tasks: list[str]) -> dict[str, float]:
    """Validate a dense run's ``result.json`` dict; return its score per task.

    Scores are ``metrics['qa/<task>/score']`` (``metrics['mmlu/acc']`` for mmlu).
    Raises ValueError (with the reason) if the run is for another model, pruned any
    layer, or lacks the score of one of ``tasks``.
    """
    tasks = validate_tasks(tasks)
    model = (result.get("choices") or {}).get("model")
    if model != model_name:
        raise ValueError(f"dense reference is for model {model!r}, not {model_name!r}")
    removed = (result.get("pruning") or {}).get("removed_layers")
    if removed != []:
        raise ValueError(f"dense reference is not dense: removed_layers={removed!r}")
    metrics = result.get("metrics") or {}
    missing = [t for t in tasks if _num(metrics.get(_score_key(t))) is None]
    if missing:
        raise ValueError(f"dense reference lacks scores for tasks: {missing}")
    return {t: float(metrics[_score_key(t)]) for t in tasks}
