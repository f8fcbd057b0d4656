"""lp.aggregate on a hand-written sweep: dense, 2 pruners x patch {none, rotate} x n {2, 4},
plus a failed, a corrupt and a missing job. Expected numbers are computed by hand below."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, svg_chart, svg_charts, svg_shapes, svg_texts

from lp import aggregate as agg

TASKS = ("wsc273", "piqa", "arc_easy")


def _result(pruner, n, patch, ppl, qa, extra=None, status="ok", error=None):
    """ppl = (wikitext2, c4); qa = scores of TASKS (0..1)."""
    metrics = {"ppl/wikitext2": ppl[0], "ppl/c4": ppl[1]}
    for t, v in zip(TASKS, qa, strict=False):
        metrics |= {f"qa/{t}/acc": v + 0.01, f"qa/{t}/acc_norm": v, f"qa/{t}/score": v}
    metrics |= extra or {}
    overrides = [f"pruner={pruner}"] + ([f"pruner.n={n}", f"patch={patch}"] if n else [])
    choices = {"model": "smollm2_135m", "pruner": pruner, "patch": patch, "distill": "none",
               "eval": "ppl_qa", "calib": "wikitext2_tok", "tracker": "none"}
    pruning = None if not n else {
        "method": pruner, "n": n, "removed_layers": list(range(20, 20 + n)), "num_layers_after": 30 - n,
        "scores": {"kind": "cosine_by_start" if pruner == "streamline" else "bi",
                   "values": [round(0.5 + 0.015 * i + 0.01 * n, 3) for i in range(30 - n + 1)]}}
    return {"status": status, "error": error, "name": f"smollm2_135m/{pruner}/{patch}/n{n}",
            "choices": choices, "overrides": overrides, "config": {"pruner": {"n": n}},
            "model": {"name": "smollm2_135m", "num_layers": 30}, "pruning": pruning,
            "patch": {"kind": patch, "cuts": []}, "metrics": metrics, "timing": {"total": 10.0 + n}}


JOBS = [  # Dense: PPL avg (10+14)/2 = 12; QA avg (60+80+70)/3 = 70
    _result("none", 0, "none", (10, 14), (0.60, 0.80, 0.70), {"mmlu/acc": 0.45}),
    # n = 2 -- PPL avg / QA avg / RP = 100 * avg / 70
    _result("shortgpt", 2, "none", (20, 30), (0.50, 0.70, 0.60)),        # 25.00 / 60.00 / 85.71
    _result("shortgpt", 2, "rotate", (15, 21), (0.55, 0.75, 0.65)),      # 18.00 / 65.00 / 92.86
    _result("streamline", 2, "none", (18, 26), (0.52, 0.74, 0.63)),  # 22.00 / 63.00 / 90.00
    # 18.00 / 66.67 / 95.24
    _result("streamline", 2, "rotate", (14, 22), (0.58, 0.76, 0.66), {"mmlu/acc": 0.40}),
    # n = 4
    _result("shortgpt", 4, "none", (60, 80), (0.40, 0.60, 0.50)),        # 70.00 / 50.00 / 71.43
    _result("shortgpt", 4, "rotate", (30, 40), (0.45, 0.65, 0.55)),      # 35.00 / 55.00 / 78.57
    # qa/avg given by the run wins over the recomputed 52.00; its qa/rp (74.0) loses to Dense: 75.71
    _result("streamline", 4, "none", (50, 70), (0.42, 0.62, 0.52), {"qa/avg": 0.53, "qa/rp": 74.0}),
    _result("streamline", 4, "rotate", (25, 37), (0.50, 0.70, 0.60)),  # 31.00 / 60.00 / 85.71
    {**_result("sleb", 2, "none", (0, 0), ()), "status": "failed",
     "error": "RuntimeError: CUDA out of memory", "metrics": {}, "pruning": {"n": 2}},
]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    for i, res in enumerate(JOBS):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "result.json").write_text(json.dumps(res))
    for i, overrides, body in ((10, ["pruner=sleb", "pruner.n=4"], '{"status": "ok", "metr'),
                               (11, ["pruner=taylor", "pruner.n=4"], None)):
        (root / str(i) / ".hydra").mkdir(parents=True)
        (root / str(i) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if body is not None:
            (root / str(i) / "result.json").write_text(body)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _block(md: str, section: str, block: str) -> list[str]:
    part = md.split(f"## {section}")[1].split("\n## ")[0]
    return part.split(f"### {block}\n")[1].strip().split("\n\n")[0].splitlines()


def test_load_and_summary(sweep, caplog):
    results = agg.load_results(sweep)
    assert "corrupt result file" in caplog.text and "10" in caplog.text
    assert [r["job_num"] for r in results] == [str(i) for i in range(12)]
    assert [r["status"] for r in results][-3:] == ["failed", "failed", "missing"]
    paths = agg.write_all(sweep)
    assert set(paths) == {"summary_csv", "table_md", "table_tex", "dashboard"}
    df = pd.read_csv(paths["summary_csv"])
    assert len(df) == 12 and df["status"].value_counts().to_dict() == {"ok": 9, "failed": 2, "missing": 1}
    row = df[df["job"] == 4].iloc[0]
    assert row[["pruner", "patch", "n", "removed_layers"]].tolist() == ["streamline", "rotate", 2, "20 21"]
    assert row["ppl/c4"] == 22 and row["qa/piqa/score"] == 0.76 and row["mmlu/acc"] == 0.40
    for col in ("error", "model", "distill", "calib", "eval", "tracker", "time/total", "qa/arc_easy/acc"):
        assert col in df
    # the corrupt/missing jobs are named from their overrides + sweep defaults
    assert df.loc[df["job"] == 10, ["pruner", "n", "model"]].values.tolist() == [["sleb", 4, "smollm2_135m"]]
    assert "corrupt result.json" in df.loc[df["job"] == 10, "error"].item()
    assert df.loc[df["job"] == 11, "pruner"].item() == "taylor"


def test_markdown_tables(sweep):
    md = agg.write_all(sweep)["table_md"].read_text()
    assert _block(md, "Perplexity", "smollm2_135m, n = 2") == [
        "| Method | WikiText2 | C4 | Avg. |", "|---|---:|---:|---:|",
        "| Dense | 10.00 | 14.00 | 12.00 |",
        "| ShortGPT | 20.00 | 30.00 | 25.00 |",
        "| +LinearPatch | 15.00 | **21.00** | **18.00** |",  # tie on Avg.: both bold
        "| LLM-Streamline | 18.00 | 26.00 | 22.00 |",
        "| +LinearPatch | **14.00** | 22.00 | **18.00** |",
        "| SLEB (failed) | — | — | — |"]
    assert _block(md, "Perplexity", "smollm2_135m, n = 4")[4:] == [
        "| +LinearPatch | 30.00 | 40.00 | 35.00 |",
        "| LLM-Streamline | 50.00 | 70.00 | 60.00 |",
        "| +LinearPatch | **25.00** | **37.00** | **31.00** |",
        "| SLEB (failed) | — | — | — |",
        "| Taylor+ (missing) | — | — | — |"]
    qa2 = _block(md, "Zero-shot QA", "smollm2_135m, n = 2")
    assert qa2[:3] == ["| Method | WSC | PIQA | ARC-e | Avg | RP | MMLU |",
                       "|---|---:|---:|---:|---:|---:|---:|",
                       "| Dense | 60.00 | 80.00 | 70.00 | 70.00 | 100.00 | 45.00 |"]
    assert "| +LinearPatch | 55.00 | 75.00 | 65.00 | 65.00 | 92.86 | — |" in qa2
    assert "| +LinearPatch | **58.00** | **76.00** | **66.00** | **66.67** | **95.24** | **40.00** |" in qa2
    qa4 = _block(md, "Zero-shot QA", "smollm2_135m, n = 4")
    assert "| ShortGPT | 40.00 | 60.00 | 50.00 | 50.00 | 71.43 | — |" in qa4
    # the run's own qa/avg wins over the task mean; RP comes from the block's Dense row: 53 / 70
    assert "| LLM-Streamline | 42.00 | 62.00 | 52.00 | 53.00 | 75.71 | — |" in qa4
    assert "| +LinearPatch | **50.00** | **70.00** | **60.00** | **60.00** | **85.71** | — |" in qa4
    failures = md.split("## Failures")[1]
    assert "job 9 (failed)" in failures and "CUDA out of memory" in failures
    assert "job 10 (failed)" in failures and "corrupt result.json" in failures
    assert "job 11 (missing)" in failures and "no result.json" in failures


def test_latex_and_dashboard(sweep, tmp_path):
    out = tmp_path / "report"
    paths = agg.write_all(sweep, out=out)
    assert all(p.parent == out and p.exists() for p in paths.values())
    assert not (sweep / "table.md").exists()
    tex = paths["table_tex"].read_text()
    assert r"\textit{smollm2\_135m, n = 2}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"+LinearPatch & \textbf{14.00} & 22.00 & \textbf{18.00} \\" in tex
    assert r"SLEB (failed) & -- & -- & -- \\" in tex
    html = paths["dashboard"].read_text()
    charts = svg_charts(html)  # no pruned ratios in these results: no PPL-vs-parameters chart
    titles = [t for c in charts for t in svg_texts(c) if t.startswith("smollm2_135m") or t.startswith("Accuracy")]
    assert titles == ["smollm2_135m: WikiText2 PPL vs. n", "smollm2_135m: C4 PPL vs. n",
                      "Accuracy x100 — smollm2_135m, n = 2", "Accuracy x100 — smollm2_135m, n = 4",
                      "smollm2_135m: ShortGPT — bi", "smollm2_135m: LLM-Streamline — cosine_by_start"]
    ppl = svg_chart(charts, "smollm2_135m: WikiText2 PPL vs. n")
    assert {"ShortGPT", "ShortGPT +LinearPatch", "LLM-Streamline +LinearPatch", "PPL"} <= set(svg_texts(ppl))
    start = svg_chart(charts, "smollm2_135m: LLM-Streamline — cosine_by_start")
    assert {"n=2", "n=4", "chosen start", "block start index"} <= set(svg_texts(start))
    assert svg_shapes(start, "removed-0") == svg_shapes(start, "removed-1") == 1  # the block start (20)
    bi = svg_chart(charts, "smollm2_135m: ShortGPT — bi")
    assert (svg_shapes(bi, "removed-0"), svg_shapes(bi, "removed-1")) == (2, 4)  # layers 20-21, 20-23
    assert "Failures (3)" in html and "CUDA out of memory" in html and "no result.json" in html
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.slow
def test_ppl_only_sweep_and_cli(sweep, capsys):
    for i in (0, 1, 2):  # strip QA: no QA table, PPL table still there
        res = json.loads((sweep / str(i) / "result.json").read_text())
        res["metrics"] = {k: v for k, v in res["metrics"].items() if k.startswith("ppl/")}
        (sweep / str(i) / "result.json").write_text(json.dumps(res))
    for i in range(3, 12):
        shutil.rmtree(sweep / str(i))
    assert agg.main([str(sweep)]) == 0
    assert str(sweep / "dashboard.html") in capsys.readouterr().out
    md = (sweep / "table.md").read_text()
    assert "## Perplexity" in md and "Zero-shot" not in md and "\nNone." in md
    assert agg.qa_table(agg.summarize(agg.load_results(sweep))).empty


def test_empty_sweep_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty_sweep"
    (empty / "0").mkdir(parents=True)  # a crashed job only: still nothing to report
    with pytest.raises(agg.NoResultsError, match="empty_sweep"):
        agg.write_all(empty)
    assert agg.main([str(empty)]) != 0
    assert "empty_sweep" in capsys.readouterr().err
    assert agg.main([str(tmp_path / "nope")]) != 0


def _console_errors(html: Path) -> list[str]:
    proc = subprocess.run(
        ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=1",
         "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True, timeout=60)
    assert "</html>" in proc.stdout
    return [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.skipif(shutil.which("chromium") is None and os.environ.get("CI") != "true",
                    reason="chromium not installed (apt-get install -y chromium; .ci/run installs it)")
def test_dashboard_renders_without_console_errors(sweep, tmp_path):
    if shutil.which("chromium") is None:  # under CI=true a missing browser is a failure, never a skip
        pytest.fail("CI=true but chromium is not installed: .ci/run installs it with apt-get as root")
    bad = tmp_path / "bad.html"  # control: the scan does see a JS error
    bad.write_text("<html><body><script>undefinedFn()</script></body></html>")
    assert any("Uncaught" in ln for ln in _console_errors(bad))
    assert _console_errors(agg.write_all(sweep)["dashboard"]) == []


def test_tables_from_python(sweep):
    df = agg.summarize(agg.load_results(sweep))
    ppl = agg.ppl_table(df)
    assert list(ppl.columns) == ["block", "method", "status", "job", "runs", "warnings", "WikiText2", "C4", "Avg."]
    dense = ppl[ppl["method"] == "Dense"]
    assert len(dense) == 2 and (dense["Avg."] == 12).all()  # Dense repeated in each n block
    qa = agg.qa_table(df)
    assert re.fullmatch(r"[\d.]+", f"{qa.loc[qa['job'] == '4', 'RP'].item():.2f}")
    assert qa.loc[qa["job"] == "4", "RP"].item() == pytest.approx(100 * (0.58 + 0.76 + 0.66) / 3 / 0.70)


def test_method_labels_name_the_selection_and_the_patch(tmp_path):
    """`pruner=linearpatch` without a patch is the paper's block selection, not a patched model."""
    rows = [_result(p, 3, patch, (20, 30), ()) for p in ("linearpatch", "angular") for patch in ("none", "rotate")]
    for i, res in enumerate(rows):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(res))
    table = agg.ppl_table(agg.summarize(agg.load_results(tmp_path)))
    assert list(table["method"]) == ["LinearPatch block", "+LinearPatch", "Angular (Gromov)", "+LinearPatch"]


@pytest.mark.slow
def test_report_vocabulary_is_defined_once():
    """Every pruner config has a display label and no label names a pruner that does not exist (the
    catalogue lp.methods); the report modules import the vocabulary, not each other (no import
    circle), and the catalogues without torch."""
    from lp import methods

    assert set(methods.PRUNERS) == {p.stem for p in (REPO / "conf" / "pruner").glob("*.yaml")}
    code = subprocess.run([sys.executable, "-c", "import lp.report.dashboard, sys; "
                           "print(sorted(m for m in sys.modules if m.startswith('lp')))"],
                          capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "lp.aggregate" not in code and "lp.report.vocab" in code and "lp.methods" in code
    light = subprocess.run([sys.executable, "-c", "import lp.methods, lp.bookkeeping, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert light.strip() == "False"


def test_qa_table_has_a_ratio_column_when_width_pruned_rows_are_in_it(tmp_path):
    width = _result("llm_pruner", 2, "none", (25, 35), (0.5, 0.7, 0.6))
    width["pruning"] = {"method": "llm_pruner", "n": 2, "removed_layers": [], "num_layers_after": 30,
                        "pruned_ratio": 0.1203, "kv_groups_removed_per_layer": 1}
    depth = _result("shortgpt", 2, "none", (20, 30), (0.50, 0.70, 0.60))
    depth["pruning"]["pruned_ratio"] = 0.1313
    for jobs, has in (([JOBS[0], depth], False), ([JOBS[0], depth, width], True)):
        d = tmp_path / str(has)
        for i, res in enumerate(jobs):
            (d / str(i)).mkdir(parents=True)
            (d / str(i) / "result.json").write_text(json.dumps(res))
        qa = agg.qa_table(agg.summarize(agg.load_results(d)))
        assert ("Pruned %" in qa.columns) == has
    assert list(qa["method"]) == ["Dense", "ShortGPT", "LLM-Pruner"]
    assert list(qa["Pruned %"].round(2))[1:] == [13.13, 12.03]  # % of dense parameters removed
