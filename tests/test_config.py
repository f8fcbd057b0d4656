"""Every option of every config group composes; every sweep preset and every grid point of it too."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
from conftest import DATA
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict, read_write

from lp.callbacks import count_jobs
from lp.sweeper import with_dense_jobs, without_width_patches

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))
           if not f.stem.startswith("_")]  # `_<part>.yaml`: shared by options (their defaults lists), not one
PRESETS = sorted(f.stem for f in (REPO / "sweeps").glob("*.yaml"))
SUBMITIT = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
JOBLIB = importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None
LAUNCHERS = [pytest.param(name, marks=pytest.mark.skipif(not ok, reason="launcher plugin not installed"))
             for name, ok in [("basic", True), ("joblib", JOBLIB), ("submitit_local", SUBMITIT),
                              ("submitit_slurm", SUBMITIT)]
             + [(f.stem, SUBMITIT) for f in sorted((CONF / "hydra" / "launcher").glob("*.yaml"))]]


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def make(*overrides: str, hydra_cfg: bool = False):
    base = [f"paths.output_dir={REPO / 'outputs' / 'never-written'}", f"data.root={DATA}"]
    return compose("config", overrides=[*base, *overrides], return_hydra_config=hydra_cfg)


def grid(preset_cfg, dense: bool = True) -> list[list[str]]:
    """The jobs' overrides, expanded exactly as the basic sweeper does (params, then command line),
    preceded by the grid's dense twins (lp.sweeper) unless ``dense=False``."""
    params = [f"{k}={v}" for k, v in preset_cfg.hydra.sweeper.params.items()]
    args = params + [o for o in preset_cfg.hydra.overrides.task if not o.startswith(("paths.", "data."))]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    jobs = without_width_patches([job for batch in batches for job in batch])
    return with_dense_jobs(jobs, preset_cfg.hydra.runtime.choices.pruner) if dense else jobs


def test_groups_found():
    assert {"model", "pruner", "patch", "eval", "calib", "tracker", "sweeps"} <= set(GROUPS)
    assert (CONF / "sweeps").resolve() == (REPO / "sweeps").resolve() and len(PRESETS) >= 4


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(hydra_ctx, group, option):
    cfg = make(f"{group}={option}", hydra_cfg=True)
    assert cfg.hydra.runtime.choices[group] == option
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_composes(hydra_ctx, launcher):
    cfg = make("sweeps=tiny_smoke", f"hydra/launcher={launcher}", hydra_cfg=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == launcher
    assert cfg.hydra.launcher._target_.rsplit(".", 1)[-1].endswith("Launcher")


def test_defaults(hydra_ctx):
    cfg = make(hydra_cfg=True)
    assert cfg.hydra.runtime.choices["sweeps"] is None and cfg.sweep_name == "adhoc"
    assert cfg.resume is True and cfg.force is False and cfg.tracker._target_ == "lp.tracking.NoneTracker"
    assert set(cfg.hydra.callbacks) == {"progress", "aggregate"}
    assert str(cfg.hydra.sweep.dir).startswith("outputs/multirun/adhoc/")
    assert not cfg.hydra.sweeper.params  # a single run stays a single run


def compose_jobs(preset: str, jobs: list[list[str]]):
    """Yield (job, composed config) per grid point: one full compose per distinct choice of config
    groups, then the job's value overrides (`a.b=v`) applied by Hydra's own override step, as
    compose does (struct mode: a key the config lacks fails)."""
    parser, composed = OverridesParser.create(), {}
    for job in jobs:
        groups = tuple(o for o in job if "." not in o.split("=", 1)[0])
        if groups not in composed:
            composed[groups] = make(f"sweeps={preset}", *groups, hydra_cfg=True)
        cfg = copy.deepcopy(composed[groups])
        ConfigLoaderImpl._apply_overrides_to_config(
            parser.parse_overrides([o for o in job if o not in groups]), cfg)
        yield job, cfg


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_and_every_grid_point_composes(hydra_ctx, preset):
    cfg = make(f"sweeps={preset}", hydra_cfg=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.sweep_name == preset
    assert str(cfg.hydra.sweep.dir).startswith(f"outputs/multirun/{preset}/")
    jobs = grid(cfg)
    assert len(jobs) == count_jobs(cfg) >= 2
    assert len({tuple(j) for j in jobs}) == len(jobs)
    for override in jobs[0]:  # a single-valued command-line override also applies to the launching config
        make(f"sweeps={preset}", override)
    for job, job_cfg in compose_jobs(preset, jobs):
        for override in job:  # every grid value arrived in the job's config
            key, value = override.split("=", 1)
            got = OmegaConf.select(job_cfg, key) if "." in key else job_cfg.hydra.runtime.choices[key]
            assert str(got).replace(" ", "") == value.replace(" ", "")
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        OmegaConf.to_container(job_cfg, resolve=True)
        pruner = instantiate(job_cfg.pruner)  # grid keys such as pruner.n are accepted
        assert getattr(pruner, "n", None) is not None or job_cfg.pruner._target_.endswith("NoPruner")


def test_command_line_replaces_a_grid_key(hydra_ctx):
    full = make("sweeps=smollm2_ppl", hydra_cfg=True)
    assert count_jobs(full) == 1 + 7 * 8 * 2  # + the dense twin
    narrowed = make("sweeps=smollm2_ppl", hydra_cfg=True)
    with read_write(narrowed.hydra):  # the command line of `run.py sweeps=smollm2_ppl pruner.n=1,2 pruner=shortgpt`
        narrowed.hydra.overrides.task = ["sweeps=smollm2_ppl", "pruner.n=1,2", "pruner=shortgpt"]
    jobs = grid(narrowed, dense=False)
    assert count_jobs(narrowed) == len(jobs) + 1 == 2 * 2 + 1
    assert {tuple(sorted(j)) for j in jobs} == {
        tuple(sorted(["sweeps=smollm2_ppl", "pruner=shortgpt", f"pruner.n={n}", f"patch={p}"]))
        for n in (1, 2) for p in ("none", "rotate")}


def test_paper_presets_match_the_paper(hydra_ctx):
    for preset in ("paper_ppl", "paper_qa"):
        cfg = make(f"sweeps={preset}", hydra_cfg=True)
        p = cfg.hydra.sweeper.params
        assert p.model == "llama2_7b,llama3_8b" and str(p["pruner.n"]) == "7" and p.patch == "none,rotate"
        width = {"llm_pruner"} if preset == "paper_qa" else set()  # LLM-Pruner rows in the QA table
        assert set(p.pruner.split(",")) == {"shortgpt", "sleb", "taylor", "streamline", "linearpatch", *width}
        assert cfg.hydra.runtime.choices.calib == "wikitext2"
    assert list(make("sweeps=paper_ppl").eval.ppl.datasets) == ["wikitext2", "ptb", "c4"]
    assert make("sweeps=paper_qa", hydra_cfg=True).hydra.runtime.choices.eval == "qa"


PRUNER_OPTIONS = sorted(f.stem for f in (CONF / "pruner").glob("*.yaml"))


@pytest.mark.parametrize("option", PRUNER_OPTIONS)
def test_every_pruner_follows_the_protocol(hydra_ctx, option):
    from lp import methods
    from lp.pruners import Pruner

    pruner = instantiate(make(f"pruner={option}").pruner)
    assert isinstance(pruner, Pruner) and pruner.name == option
    assert methods.label(option) == methods.PRUNERS[option].label  # its label is in the one catalogue...
    assert not hasattr(pruner, "label") and not hasattr(pruner, "width")  # ...and nowhere else
    assert type(pruner.n) is int and pruner.n >= 0 and (pruner.n == 0) == (option == "none")
    assert type(pruner.needs_calibration) is bool
    assert pruner.needs_calibration == (option not in ("none", "manual"))


def test_pruner_none_takes_only_n_0(hydra_ctx):
    from lp.pruners.none import NoPruner

    assert instantiate(make("pruner=none").pruner).n == 0
    launching = make("sweeps=smollm2_quick", "pruner.n=4")  # no `override /pruner` in the preset any more
    assert launching.pruner._target_ == "lp.pruners.none.NoPruner" and launching.pruner.n == 4  # composes
    for bad in (4, True):
        with pytest.raises(ValueError, match=rf"pruner=none removes nothing: pruner.n={bad!r} must be 0"):
            NoPruner(bad)


def test_dense_twins_one_per_model_and_eval_settings(hydra_ctx):
    """The sweeper adds one dense job per distinct (model, evaluation) of the pruned jobs, first;
    pruning, patch, calibration and seed keys do not make another; a dense job in the grid counts."""
    cfg = make("sweeps=smollm2_quick", hydra_cfg=True)
    with read_write(cfg.hydra):
        cfg.hydra.overrides.task = ["sweeps=smollm2_quick", "calib.nsamples=4,16", "seed=0,1",
                                    "eval.ppl.max_windows=4,8"]
    jobs = grid(cfg)
    assert len(jobs) == count_jobs(cfg) == 2 + 8 * 2 * 2 * 2
    assert jobs[:2] == [["sweeps=smollm2_quick", f"eval.ppl.max_windows={w}", "pruner=none", "patch=none",
                         "distill=none"] for w in (4, 8)]
    for _job, job_cfg in compose_jobs("smollm2_quick", jobs[:2]):
        assert job_cfg.hydra.runtime.choices.pruner == "none" and job_cfg.patch.kind == "none"
    with_dense = [["pruner=none", "model=a"], ["pruner=shortgpt", "pruner.n=2", "model=a"], ["pruner=shortgpt", "model=b"]]
    assert with_dense_jobs(with_dense, "linearpatch") == [["model=b", "pruner=none", "patch=none", "distill=none"],
                                                         *with_dense]
    assert with_dense_jobs([["model=a"]], "none") == [["model=a"]]  # a dense grid: nothing added


def test_eval_full_composes_its_sections_and_calib_quick_inherits(hydra_ctx):
    full, ppl = make("eval=full").eval, make("eval=ppl").eval.ppl
    assert set(full) == {"ppl", "qa", "mmlu", "generate"}  # generate: conf/config.yaml, for every eval option
    assert full.qa == make("eval=qa").eval.qa and full.mmlu == make("eval=mmlu").eval.mmlu
    assert list(full.ppl.datasets) == ["wikitext2", "ptb"]
    assert {k: v for k, v in full.ppl.items() if k != "datasets"} == {k: v for k, v in ppl.items() if k != "datasets"}
    for option, section in (("ppl", "ppl"), ("qa", "qa"), ("mmlu", "mmlu"), ("quick", "ppl"), ("qa_quick", "qa")):
        assert set(make(f"eval={option}").eval) == {section, "generate"}  # each file owns its section only
    quick = make("eval=quick").eval.ppl
    assert {k for k in ppl if quick[k] != ppl[k]} == {"seqlen", "batch_size", "max_windows"}
    base, small = make("calib=wikitext2_tok").calib, make("calib=quick").calib
    assert {k for k in base if small[k] != base[k]} == {"nsamples", "seqlen", "batch_size"}
    assert (small.nsamples, small.seqlen, small.batch_size) == (16, 512, 4) and set(small) == set(base)


def test_width_pruners_are_one_fact_of_the_method_catalogue(monkeypatch):
    """lp.methods alone says which pruners prune width: the sweeper and the tables ask it (the run and
    the validation too: test_llm_pruner), so a method marked there is treated as one everywhere."""
    import pandas as pd

    from lp import methods
    from lp.report.tables import _ratios_differ

    assert [p for p in methods.PRUNERS if methods.prunes_width(p)] == ["llm_pruner"]
    jobs = [[f"pruner={p}", "patch=rotate"] for p in methods.PRUNERS]
    assert [j[0] for j in jobs if j not in without_width_patches(jobs)] == ["pruner=llm_pruner"]
    rows = pd.DataFrame({"pruner": ["none", "sleb"], "n": [0, 2], "status": "ok", "model": "m",
                         "pruned_ratio_%": [0.0, 2.5]})
    assert not _ratios_differ(rows)
    monkeypatch.setitem(methods.PRUNERS, "sleb", methods.Method("SLEB", width=True))
    assert [j[0] for j in jobs if j not in without_width_patches(jobs)] == ["pruner=sleb", "pruner=llm_pruner"]
    assert _ratios_differ(rows)


def test_paper_qa_has_llm_pruner_rows_without_patch(hydra_ctx):
    jobs = grid(make("sweeps=paper_qa", hydra_cfg=True), dense=False)
    width = [j for j in jobs if "pruner=llm_pruner" in j]
    assert len(width) == 2 and all("patch=none" in j for j in width)  # one per model; patch=rotate left out
    assert len(jobs) == 2 * 5 * 2 + 2
