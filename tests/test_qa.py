"""Zero-shot QA / MMLU evaluation through lm-eval on the offline data mirror."""

import json
import math
from pathlib import Path

import pytest
from conftest import DATA

from lp.evaluate.lm_eval_tasks import (
    PAPER_METRIC,
    PAPER_QA_TASKS,
    QA_TASKS,
    SUPPORTED_TASKS,
    average,
    avg_complete,
    check_dense_reference,
    evaluate_tasks,
    load_tasks,
    retained_performance,
)
from lp.models import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def data_dir():
    assert (DATA / "README.md").is_file(), f"offline data mirror not found at {DATA}"
    return DATA


def _lines(path: Path) -> int:
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


def test_tiny_model_end_to_end(data_dir):
    model, tok = tiny_model("llama", num_layers=2), byte_tokenizer()
    tasks = ["arc_easy", "copa", "piqa"]
    metrics, info = evaluate_tasks(
        model, tok, tasks, data_dir=data_dir, limit=8, batch_size=8, progress=False
    )
    for t in tasks:
        for m in ("acc", "acc_stderr", "score"):
            assert 0.0 <= metrics[f"qa/{t}/{m}"] <= 1.0, (t, m)
        assert metrics[f"qa/{t}/score"] == metrics[f"qa/{t}/{PAPER_METRIC[t]}"]
        assert info["n_samples"][t]["effective"] == 8
        assert info["n_shot"][t] == 0
    assert metrics["qa/copa/acc_norm"] is None and metrics["qa/copa/acc_norm_stderr"] is None
    assert 0.0 <= metrics["qa/arc_easy/acc_norm"] <= 1.0
    assert math.isclose(metrics["qa/avg"], sum(metrics[f"qa/{t}/score"] for t in tasks) / 3)
    assert info["avg_tasks"] == tasks and not info["avg_complete"]
    assert info["limit"] == 8 and info["lm_eval_version"] and set(tasks) <= set(info["task_versions"])
    json.dumps(metrics), json.dumps(info)  # result.json-serialisable


def test_retained_performance_and_average():
    pruned = {"piqa": 0.5, "boolq": 0.3}
    dense = {"piqa": 0.6, "boolq": 0.4}
    assert math.isclose(retained_performance(pruned, dense), (0.5 / 0.6 + 0.3 / 0.4) / 2 * 100)
    assert math.isclose(retained_performance(dense, dense), 100.0)
    assert math.isclose(average(pruned), 0.4)
    with pytest.raises(ValueError, match="task sets differ"):
        retained_performance(pruned, {"piqa": 0.6})


def test_avg_complete_means_the_papers_nine_whatever_else_is_supported(monkeypatch):
    """`avg_complete` compares with the paper's nine (PAPER_QA_TASKS), not with the supported QA tasks
    (QA_TASKS): supporting one more task changes no run's `avg_complete`. eval=qa runs the nine, and
    every supported QA task has a table column name."""
    import yaml

    from lp.evaluate import lm_eval_tasks
    from lp.report.vocab import TASK_NAMES

    assert len(PAPER_QA_TASKS) == 9 and set(PAPER_QA_TASKS) <= set(QA_TASKS)
    assert avg_complete(list(PAPER_QA_TASKS)) and not avg_complete(PAPER_QA_TASKS[:8])
    monkeypatch.setattr(lm_eval_tasks, "QA_TASKS", (*QA_TASKS, "openbookqa"))  # a task supported later
    assert lm_eval_tasks.avg_complete(list(PAPER_QA_TASKS))
    assert not lm_eval_tasks.avg_complete([*PAPER_QA_TASKS, "openbookqa"])  # a different average
    conf = Path(__file__).resolve().parents[1] / "conf" / "eval" / "qa.yaml"
    assert yaml.safe_load(conf.read_text())["qa"]["tasks"] == list(PAPER_QA_TASKS)
    assert set(QA_TASKS) <= set(TASK_NAMES)


def test_every_task_loads_all_rows_of_the_mirror(data_dir):
    top, _ = load_tasks(list(SUPPORTED_TASKS), data_dir=data_dir)
    mirror = {
        "wsc273": "wsc273/test.jsonl", "hellaswag": "hellaswag/validation.jsonl",
        "piqa": "piqa/validation.jsonl", "arc_easy": "arc_easy/test.jsonl",
        "arc_challenge": "arc_challenge/test.jsonl", "boolq": "boolq/validation.jsonl",
        "winogrande": "winogrande/validation.jsonl", "race": "race/test.jsonl",  # 1 doc per article
        "copa": "copa/validation.jsonl",
    }
    by_name = {getattr(o, "task_name", getattr(o, "name", None)): o for o in top}
    for t in QA_TASKS:
        task = by_name[t]
        assert len(task.eval_docs) == _lines(data_dir / mirror[t]), t
        assert task.config.num_fewshot == 0
    subjects = by_name["mmlu"].get_all_tasks()
    assert len(subjects) == 57
    assert sum(len(s.eval_docs) for s in subjects) == _lines(data_dir / "mmlu/test.jsonl") == 14042
    algebra = next(s for s in subjects if s.task_name == "mmlu_abstract_algebra")
    assert algebra.config.num_fewshot == 5
    assert algebra.config.description.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra."
    )
    shots = list(algebra.fewshot_docs())
    assert len(shots) == 5 and {d["subject"] for d in shots} == {"abstract_algebra"}
    assert {d["subject"] for d in algebra.eval_docs} == {"abstract_algebra"}


def test_unknown_task_lists_supported_tasks():
    with pytest.raises(ValueError) as err:
        evaluate_tasks(None, None, ["arc_eazy"], data_dir=None, limit=1, batch_size=1)
    msg = str(err.value)
    assert "Did you mean 'arc_easy'" in msg
    assert all(t in msg for t in SUPPORTED_TASKS)


def test_missing_local_file_is_named_before_evaluation(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "copa" / "validation.jsonl")):
        evaluate_tasks(None, None, ["copa"], data_dir=tmp_path, limit=1, batch_size=1)
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "test.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="mmlu/dev.jsonl"):
        load_tasks(["mmlu"], data_dir=tmp_path)


def test_dense_reference_checks():
    tasks = ["piqa", "copa"]
    ok = {
        "choices": {"model": "llama-7b"},
        "pruning": {"removed_layers": []},
        "metrics": {"qa/piqa/score": 0.78, "qa/copa/score": 0.85, "qa/avg": 0.815},
    }
    assert check_dense_reference(ok, model_name="llama-7b", tasks=tasks) == {"piqa": 0.78, "copa": 0.85}
    with pytest.raises(ValueError, match="model"):
        check_dense_reference(ok, model_name="llama-13b", tasks=tasks)
    with pytest.raises(ValueError, match="not dense"):
        check_dense_reference({**ok, "pruning": {"removed_layers": [3]}}, model_name="llama-7b", tasks=tasks)
    with pytest.raises(ValueError, match="boolq"):
        check_dense_reference(ok, model_name="llama-7b", tasks=tasks + ["boolq"])
