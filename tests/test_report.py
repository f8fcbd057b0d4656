"""lp.report on hand-written result records: ablation labels, seeds as mean ± std, refused dense
results, settings captions (smoke = subset evaluation: nothing bolded), run warnings, flat summary."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest
from conftest import svg_chart, svg_charts, svg_shapes, svg_texts

from lp import aggregate as agg


def _rec(pruner, n, patch="none", ppl=10.0, overrides=(), seed=0, nsamples=16, hadamard=None,
         max_windows=8, limit=None, qa=None, warnings=None, model="smol", status="ok"):
    config = {"seed": seed, "model": {"name": model, "dtype": "bfloat16"},
              "calib": {"corpus": "wikitext2_tok", "split": "train", "nsamples": nsamples, "seqlen": 512},
              "patch": {"kind": patch, **({"hadamard": hadamard} if hadamard else {})},
              "eval": {"ppl": {"datasets": ["wikitext2"], "split": "test", "seqlen": 512,
                               "max_windows": max_windows, "progress": False},
                       "qa": None if qa is None else {"tasks": list(qa), "limit": limit, "num_fewshot": None}}}
    metrics = {"ppl/wikitext2": ppl} | {f"qa/{t}/score": v for t, v in (qa or {}).items()}
    return {"status": status, "name": f"{model}/{pruner}/{patch}/n{n}", "config": config,
            "choices": {"model": "smollm2_135m", "pruner": pruner, "patch": patch, "distill": "none"},
            "overrides": [f"pruner={pruner}", f"patch={patch}", *overrides],
            "model": {"name": model, "dtype": "bfloat16"},
            "pruning": {"n": n, "removed_layers": list(range(10, 10 + n)), "pruned_ratio": 0.0123 * n},
            "data": {"ppl/wikitext2": {"windows": max_windows or 40, "seqlen": 512},
                     "calibration": {"corpus": "wikitext2_tok"} if n else None},
            "patch": {"kind": patch}, "metrics": metrics, "warnings": warnings or []}


def _sweep(tmp_path: Path, records: list[dict]) -> Path:
    for i, r in enumerate(records):
        (tmp_path / str(i)).mkdir(parents=True)
        (tmp_path / str(i) / "result.json").write_text(json.dumps(r))
    return tmp_path


def _ppl(tmp_path, records) -> pd.DataFrame:
    return agg.ppl_table(agg.summarize(agg.load_results(_sweep(tmp_path, records))))


def test_non_group_ablation_rows_are_labelled_with_their_values(tmp_path):
    recs = [_rec("none", 0, ppl=9.0)] + [
        _rec("shortgpt", 2, patch, ppl=20.0 - k - (3 if patch != "none" else 0),
             overrides=[f"calib.nsamples={k}"], nsamples=k) for patch in ("none", "rotate") for k in (4, 16)]
    table = _ppl(tmp_path, recs)
    assert list(table["method"]) == ["Dense", "ShortGPT (nsamples=4)", "ShortGPT (nsamples=16)",
                                     "+LinearPatch (nsamples=4)", "+LinearPatch (nsamples=16)"]
    assert list(table["WikiText2"]) == [9.0, 16.0, 4.0, 13.0, 1.0]
    assert not table["method"].str.contains("#").any()


def _auto(pruner, kinds, ppl, seed=0):
    """A patch=auto run that chose ``kinds`` (one per cut) on held-out windows."""
    r = _rec(pruner, 2, "auto", ppl=ppl, seed=seed, overrides=[f"seed={seed}"])
    r["patch"]["verification"] = {"configured": "auto", "choice": [{"start": 10 + i, "kind": k}
                                                                   for i, k in enumerate(kinds)]}
    return r


def test_patched_rows_are_named_after_their_kinds_method(tmp_path):
    """rotate is the paper's LinearPatch; every other kind names its own estimator, and auto the kinds
    it chose (distinct kinds of the row's runs joined with /): no row credits LinearPatch with the
    numbers of another method."""
    recs = [_rec("none", 0, ppl=9.0), _rec("shortgpt", 2, ppl=14.0)]
    recs += [_rec("shortgpt", 2, k, ppl=v) for k, v in (("rotate", 12.0), ("lstsq", 11.0), ("diag", 13.0))]
    recs += [_auto("shortgpt", ["lstsq", "lstsq"], 10.0), _auto("shortgpt", ["lstsq", "diag"], 11.0, seed=1),
             _auto("sleb", ["scalar"], 12.5), _rec("angular", 2, "auto", ppl=13.5)]  # angular: recorded no choice
    _sweep(tmp_path, recs)
    df = agg.summarize(agg.load_results(tmp_path))
    assert list(df["patch_chosen"].fillna("-")) == ["-"] * 5 + ["lstsq", "lstsq/diag", "scalar", "-"]
    table = agg.ppl_table(df)
    assert list(table["method"]) == ["Dense", "ShortGPT", "+LinearPatch", "+lstsq", "+diag", "+auto → lstsq/diag",
                                     "SLEB +auto → scalar", "Angular (Gromov) +auto"]
    assert not table["method"].str.contains(r"LinearPatch \(").any()
    paths = agg.write_all(tmp_path)
    md = paths["table_md"].read_text()
    assert "| +lstsq | 11.00 |" in md and "| +auto → lstsq/diag | 10.50 ± 0.71 |" in md
    assert r"+auto $\to$ lstsq/diag" in paths["table_tex"].read_text()
    ppl_n = svg_chart(svg_charts(paths["dashboard"].read_text()), "smol: WikiText2 PPL vs. n")
    assert {"ShortGPT +LinearPatch", "ShortGPT +lstsq", "ShortGPT +auto → lstsq/diag", "SLEB +auto → scalar"} \
        <= set(svg_texts(ppl_n))
    plain = agg.summarize(agg.load_results(_sweep(tmp_path / "plain", recs[:3])))
    assert "patch_chosen" not in plain  # no run of patch=auto: no column


def test_seeds_aggregate_to_mean_and_std_and_bases_label(tmp_path):
    recs = [_rec("none", 0, ppl=9.0)]
    for basis, vals in (("constructed", (10.0, 12.0, 14.0)), ("random", (11.0, 11.0, 11.0))):
        recs += [_rec("linearpatch", 3, "rotate", ppl=v, hadamard=basis, seed=s,
                      overrides=[f"patch.hadamard={basis}", f"seed={s}"]) for s, v in enumerate(vals)]
    table = _ppl(tmp_path, recs)
    rows = table.set_index("method")
    assert list(rows.index) == ["Dense", "LinearPatch block +LinearPatch (hadamard=constructed)",
                                "LinearPatch block +LinearPatch (hadamard=random)"]
    r = rows.loc["LinearPatch block +LinearPatch (hadamard=constructed)"]
    assert r["WikiText2"] == 12.0 and r["WikiText2 std"] == pytest.approx(2.0) and r["runs"] == 3
    assert r["job"] == "1,2,3"
    md = agg.write_all(tmp_path)["table_md"].read_text()
    assert "| LinearPatch block +LinearPatch (hadamard=constructed) | 12.00 ± 2.00 |" in md
    assert "| LinearPatch block +LinearPatch (hadamard=random) | 11.00 ± 0.00 |" in md


def test_dense_with_other_eval_settings_is_refused(tmp_path):
    recs = [_rec("none", 0, ppl=46.06, max_windows=16), _rec("shortgpt", 2, ppl=40.83)]
    table = _ppl(tmp_path, recs)
    assert list(table["method"]) == ["ShortGPT"]  # never shown beside the pruned rows
    assert "Dense job 0" in table.attrs["notes"][0] and "max_windows=16" in table.attrs["notes"][0]
    md = agg.write_all(tmp_path)["table_md"].read_text()
    assert "46.06" not in md and "Dense job 0 (smol) not shown" in md


def test_caption_smoke_settings_and_single_dataset(tmp_path):
    qa = {"piqa": 0.6}
    recs = [_rec("none", 0, ppl=9.0, qa=qa, limit=20), _rec("shortgpt", 2, ppl=12.0, qa={"piqa": 0.5}, limit=20)]
    paths = agg.write_all(_sweep(tmp_path, recs))
    md = paths["table_md"].read_text()
    assert "Settings: Model: smol (bfloat16); calibration: wikitext2_tok/train, 16 × 512 tokens; " \
           "PPL: test split, 8 windows × 512 tokens." in md
    assert "QA: protocol-default shots, limit 20 examples per task" in md
    assert "SMOKE SETTINGS" in md and "QA on a SUBSET (20 examples per task)" in md
    assert "**" not in md  # a smoke table is never bolded
    assert "Avg" not in md  # one PPL dataset, one QA task: no average column
    assert "| ShortGPT | 12.00 |" in md and "| ShortGPT | 50.00 | 83.33 |" in md  # RP = 50 / 60
    assert r"$\times$" in paths["table_tex"].read_text()
    full = [_rec("none", 0, ppl=9.0, max_windows=None), _rec("shortgpt", 2, ppl=12.0, max_windows=None),
            _rec("sleb", 2, ppl=11.0, max_windows=None)]
    md = agg.write_all(_sweep(tmp_path / "full", full))["table_md"].read_text()
    assert "SMOKE" not in md and "| SLEB | **11.00** |" in md and "40 windows × 512" in md


def test_warnings_mark_the_row(tmp_path):
    recs = [_rec("none", 0, ppl=9.0), _rec("shortgpt", 2, ppl=12.0),
            _rec("shortgpt", 2, "rotate", ppl=13.0, warnings=["patch worse than none: held-out NLL 3.2 > 3.1; "
                                                              "best here: diag", "selection check"])]
    paths = agg.write_all(_sweep(tmp_path, recs))
    md = paths["table_md"].read_text()
    assert "| +LinearPatch ⚠ | 13.00 |" in md
    assert "- ⚠ job 2: patch worse than none: held-out NLL 3.2 > 3.1; best here: diag\n" in md  # one bullet each
    assert "- ⚠ job 2: selection check\n" in md
    assert r"+LinearPatch $^\dagger$" in paths["table_tex"].read_text()
    html = paths["dashboard"].read_text()
    assert "+LinearPatch ⚠" in html and "patch worse than none" in html


def test_summary_csv_has_flat_settings(tmp_path):
    recs = [_rec("shortgpt", 2, "rotate", overrides=["calib.nsamples=4", "seed=1"], nsamples=4, seed=1,
                 hadamard="official", model="local-x")]
    df = pd.read_csv(agg.write_all(_sweep(tmp_path, recs))["summary_csv"])
    row = df.iloc[0]
    assert row["model"] == "local-x" and row["model_config"] == "smollm2_135m"  # model.name, not the group
    assert row["calib.nsamples"] == 4 and row["calib.seqlen"] == 512 and row["seed"] == 1
    assert row["patch.hadamard"] == "official" and row["pruned_ratio_%"] == pytest.approx(2.46)
    assert row["eval.ppl.max_windows"] == 8 and row["ppl_windows"] == 8
    assert not any(isinstance(v, str) and v.startswith("{") for v in row.values)  # no dict strings


def test_compare_cli_prints_tables_of_runs_and_sweeps(tmp_path, capsys):
    from lp.__main__ import main

    sweep = _sweep(tmp_path / "sweep", [_rec("none", 0, ppl=9.0), _rec("shortgpt", 2, ppl=12.0)])
    single = tmp_path / "run"
    single.mkdir()
    (single / "result.json").write_text(json.dumps(_rec("sleb", 2, ppl=11.0)))
    assert main(["compare", str(sweep), str(single / "result.json")]) == 0
    out = capsys.readouterr().out
    assert "# Comparison" in out and "| Dense | 9.00 |" in out and "| ShortGPT | 12.00 |" in out
    assert "| SLEB | 11.00 |" in out and "Settings:" in out
    assert not (sweep / "table.md").exists()  # compare writes nothing
    assert main(["compare", str(single), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("job,status")
    assert main(["compare", str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    assert main(["aggregate", str(sweep)]) == 0 and (sweep / "dashboard.html").is_file()


def test_dashboard_heatmap_removed_layers_params_plot_and_warnings(tmp_path):
    sim = [[round(1 - abs(i - j) / 10, 2) for j in range(7)] for i in range(7)]
    recs = [_rec("none", 0, ppl=9.0)]
    for n, ppl in ((1, 10.0), (2, 12.0)):
        r = _rec("shortgpt", n, ppl=ppl, warnings=["patch worse than none"] if n == 2 else None)
        r["pruning"].update(similarity=sim, removed_layers=[3, 4][:n],
                            scores={"kind": "block_influence", "values": [0.5, 0.4, 0.3, 0.1, 0.2, 0.6]})
        recs.append(r)
    html = agg.write_all(_sweep(tmp_path, recs))["dashboard"].read_text()
    charts = svg_charts(html)
    assert len(charts) == 4  # PPL vs. n, PPL vs. removed parameters, heatmap, one score chart
    heat = svg_chart(charts, "smol: cos(h_i, h_j), calibration tokens")
    assert svg_shapes(heat, "cells") == 49  # 7 x 7 cells
    outlined = sorted(int(i) for i in re.findall(r"removed-(?:row|col)-(\d+)", ET.tostring(heat, "unicode")))
    assert outlined == [3, 3, 4, 4]  # layers 3 and 4 framed, row and column
    scores = svg_chart(charts, "smol: ShortGPT — block_influence")
    assert "n=1,2" in svg_texts(scores) and "removed" in svg_texts(scores)  # one curve: same scores
    assert svg_shapes(scores, "removed-0") == 2 and svg_shapes(scores, "removed-1") == -1  # 3, 4 ringed
    params = svg_chart(charts, "smol: WikiText2 PPL vs. removed parameters")
    assert "removed parameters (%)" in svg_texts(params)
    for chart in (params, svg_chart(charts, "smol: WikiText2 PPL vs. n")):
        texts = svg_texts(chart)  # the warned run's point and legend entry carry the ⚠ marker
        assert "ShortGPT ⚠" in texts and texts.count("⚠") == 1
    assert "2.46%" in html  # the job list shows the pruned ratio in percent (n=2: 2 x 1.23%)
    assert "⚠ patch worse than none" in html and "ShortGPT ⚠" in html


def test_dashboard_is_deterministic_and_self_contained(tmp_path):
    recs = [_rec("none", 0, ppl=9.0, qa={"piqa": 0.6}), _rec("shortgpt", 2, ppl=12.0, qa={"piqa": 0.5}),
            _rec("shortgpt", 2, "rotate", ppl=11.0, qa={"piqa": 0.55})]
    sweep = _sweep(tmp_path / "sweep", recs)
    first = agg.write_all(sweep, out=tmp_path / "a")["dashboard"].read_bytes()
    assert agg.write_all(sweep, out=tmp_path / "b")["dashboard"].read_bytes() == first  # byte-identical
    html = first.decode()
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html and "<metadata" not in html
    clip_ids = re.findall(r'<clipPath id="([^"]+)"', html)
    assert len(svg_charts(html)) == len(set(clip_ids)) == len(clip_ids) == 3  # no chart shares a clip path
    bars = svg_chart(svg_charts(html), "Accuracy x100 — smol, n = 2")
    assert {"PIQA", "Dense", "ShortGPT", "ShortGPT +LinearPatch", "accuracy x100"} <= set(svg_texts(bars))


def test_end_of_run_and_sweep_messages(tmp_path):
    from lp.report.messages import summary_line, sweep_message

    metrics = {"ppl/wikitext2": 12.3456, "qa/avg": 0.61234, "qa/rp": 93.5} | {f"qa/t{i}/acc": 0.5 for i in range(30)}
    result = {"name": "m/shortgpt/rotate/n2", "pruning": {"removed_layers": [3, 4], "pruned_ratio": 0.1},
              "metrics": metrics, "timing": {"total": 5.0}, "warnings": ["patch worse than none"],
              "saved_model": str(tmp_path / "model")}
    text = summary_line(result, tmp_path)
    first = text.splitlines()[0]
    assert first.index("qa/avg=61.23") < first.index("RP=93.50%") < first.index("ppl/wikitext2=12.346")
    assert "qa/t0" not in text and "(+30 more in result.json)" in first
    assert f"[lp] result: {tmp_path / 'result.json'}" in text and f"saved model: {tmp_path / 'model'}" in text
    assert "[lp] WARNING: patch worse than none" in text
    records = [{"job_num": "0", "status": "ok"}, {"job_num": "1", "status": "ok", "resumed_from": "x"},
               {"job_num": "2", "status": "failed", "overrides": ["pruner=sleb"], "error": "RuntimeError: OOM\nmore"}]
    msg = sweep_message("quick", records, {"table_md": tmp_path / "table.md", "dashboard": tmp_path / "d.html"})
    assert msg.splitlines()[0] == "sweep quick done: 1 failed, 2 ok (1 resumed)"
    assert f"table:     {tmp_path / 'table.md'}" in msg and f"dashboard: {tmp_path / 'd.html'}" in msg
    assert "FAILED job 2 (failed): pruner=sleb -- RuntimeError: OOM" in msg and "more" not in msg


def test_ratio_column_when_a_block_mixes_parameter_shares(tmp_path):
    recs = [_rec(p, n, ppl=v, max_windows=None) for p, n, v in (("none", 0, 9.0), ("shortgpt", 2, 12.0),
                                                                ("llm_pruner", 2, 11.0))]
    recs[0]["pruning"]["pruned_ratio"] = 0.0
    recs[2]["pruning"]["pruned_ratio"] = 0.0250
    table = _ppl(tmp_path, recs)
    assert list(table["method"]) == ["Dense", "ShortGPT", "LLM-Pruner"]
    assert list(table["Pruned %"]) == pytest.approx([0.0, 2.46, 2.5])
    md = agg.write_all(tmp_path)["table_md"].read_text()
    assert "| Method | Pruned % | WikiText2 |" in md and "| LLM-Pruner | 2.50 | **11.00** |" in md
    assert "| ShortGPT | 2.46 | 12.00 |" in md  # the ratio is never bolded
    same = _ppl(tmp_path / "same", [_rec("none", 0), _rec("shortgpt", 2), _rec("sleb", 2)])
    assert "Pruned %" not in same  # depth pruners of one n remove the same share: no column


def test_progress_bars_for_calibration_and_selection(capsys):
    """Calibration statistics, the sleb / ppl / taylor re-scoring and LLM-Pruner's gradient pass show a tqdm bar (with an ETA)
    when the context asks for it, and nothing when it does not."""
    import torch

    from lp.calib import Calibration, get_stats
    from lp.models import tiny_model
    from lp.pruners import PruneContext
    from lp.pruners.llm_pruner import LLMPruner
    from lp.pruners.ppl import PPLPruner
    from lp.pruners.sleb import SLEBPruner
    from lp.pruners.taylor import TaylorPruner

    model = tiny_model("llama", num_layers=8, hidden_size=64, seed=0)
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))

    def ctx(progress):
        return PruneContext(model, None, Calibration(lambda: (windows, {"windows": 4})), cache_key={}, progress=progress)

    for progress in (False, True):
        get_stats(ctx(progress))
        SLEBPruner(n=2, disk_cache=False).select(ctx(progress))
        PPLPruner(n=1, disk_cache=False).select(ctx(progress))
        TaylorPruner(n=1, disk_cache=False).select(ctx(progress))
        LLMPruner(ratio=0.1, n=None, keep_first=2, keep_last=2, disk_cache=False).select(ctx(progress))
        err = capsys.readouterr().err
        if not progress:
            assert err == ""
    for desc in ("calibration statistics", "sleb step 1/2", "sleb step 2/2", "ppl scoring", "taylor gradients",
                 "llm_pruner gradients"):
        assert desc in err, err
    assert "100%" in err and "<" in err  # tqdm's elapsed<remaining (ETA)


def test_run_name_includes_non_group_settings():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lp.run import run_name

    cfg = OmegaConf.create({"model": {"name": "smol"}, "patch": {"kind": "rotate"}})
    pruner = SimpleNamespace(name="shortgpt", n=4)
    assert run_name(cfg, pruner) == "smol/shortgpt/rotate/n4"
    overrides = ["sweeps=q", "pruner=shortgpt", "pruner.n=4", "calib.nsamples=4", "seed=1",
                 "patch.hadamard=random", "paths.output_dir=/x", "eval.ppl.progress=false", "runtime.threads=1"]
    assert run_name(cfg, pruner, overrides) == "smol/shortgpt/rotate/n4/nsamples=4,seed=1,hadamard=random"
    # a local model folder: its name, never the whole path (dtype and other values stay as they are)
    local = ["model.pretrained=/data/models/llama-3-8b/", "model.dtype=bfloat16"]
    assert run_name(cfg, pruner, local) == "smol/shortgpt/rotate/n4/pretrained=llama-3-8b,dtype=bfloat16"


def test_bookkeeping_keys_are_left_out_alike_by_hash_run_name_and_summary():
    """One definition (lp.bookkeeping): resume's config hash ignores, run names and the summary's
    setting columns leave out the same keys; `model.name` / `pruner.n` are left out of run names only
    (parts of the name already)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lp.bookkeeping import BOOKKEEPING, PROGRESS, is_bookkeeping
    from lp.callbacks import config_hash
    from lp.report.results import override_keys
    from lp.run import IN_RUN_NAME, run_name

    book = [f"{k}.x=1" for k in BOOKKEEPING] + [f"{k}=1" for k in BOOKKEEPING] + [f"eval.ppl.{PROGRESS}=false",
                                                                                 f"+{PROGRESS}=false"]
    settings = ["calib.nsamples=4", "data.source=local", "seed=1", "eval.qa.limit=2"]
    assert all(is_bookkeeping(o.partition("=")[0]) for o in book)
    assert not any(is_bookkeeping(o.partition("=")[0]) for o in settings + ["pruner.n=2", "paths_x.y=1"])
    cfg = OmegaConf.create({"model": {"name": "smol"}, "patch": {"kind": "rotate"}})
    name = run_name(cfg, SimpleNamespace(name="shortgpt", n=4), [*book, *settings, "pruner.n=4", "model.name=smol"])
    assert name == "smol/shortgpt/rotate/n4/nsamples=4,source=local,seed=1,limit=2"
    assert IN_RUN_NAME == ("model.name", "pruner.n")
    keys = override_keys([{"overrides": [*book, *settings, "pruner.n=4", "pruner=sleb"], "choices": {"pruner": "sleb"}}])
    assert keys == ["calib.nsamples", "data.source", "seed", "eval.qa.limit", "pruner.n"]
    base = OmegaConf.create({"seed": 0, "calib": {"nsamples": 16}, "data": {"source": "auto"}, "eval": {"ppl": {"seqlen": 64}}})

    def hashed(override: str) -> str:
        c = base.copy()
        key, _, value = override.lstrip("+").partition("=")
        OmegaConf.update(c, key, value, force_add=True)
        return config_hash(c)

    assert all(hashed(o) == config_hash(base) for o in book)
    assert all(hashed(o) != config_hash(base) for o in settings)


def test_compare_counts_a_resumed_job_once_and_merges_repeated_warnings(tmp_path, capsys):
    """Two runs of one sweep: the second resumed job 1 from the first (a copy with `resumed_from`);
    comparing both folders counts that run once. The same warning of several jobs is one bullet."""
    from lp.__main__ import main

    warn = ["selection check: candidate #1 is better; pruner.rerank=2 would pick it"]
    first = _sweep(tmp_path / "s" / "t1", [_rec("none", 0, ppl=9.0), _rec("shortgpt", 2, "rotate", ppl=12.0,
                                                                          seed=0, overrides=["seed=0"], warnings=warn)])
    resumed = {**json.loads((first / "1" / "result.json").read_text()),
               "resumed_from": str((first / "1" / "result.json").resolve())}
    second = _sweep(tmp_path / "s" / "t2", [resumed, _rec("shortgpt", 2, "rotate", ppl=14.0, seed=1,
                                                     overrides=["seed=1"], warnings=warn)])
    assert main(["compare", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    assert "| ShortGPT +LinearPatch ⚠ | 13.00 ± 1.41 |" in out  # mean ± std of seeds 0 and 1 (12, 14), not of 12, 12, 14
    assert out.count("pruner.rerank=2 would pick it") == 1
    assert "- ⚠ jobs 0:1, 1:1: selection check: candidate #1 is better; pruner.rerank=2 would pick it" in out
