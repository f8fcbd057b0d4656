"""Shared test helpers: the data mirror beside the clone, the tiny-run settings every end-to-end test
starts from, a composed config for `run(cfg)`, the `run.py` command line, and the dashboard's inline SVG
charts, parsed.

Pure unit tests do not need the data mirror: only `make_cfg` / `cli` (and the tests that read the
mirror themselves) fail, with one clear line, when it is missing."""

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LP_DATA_DIR") or REPO.parent / "shared" / "data").resolve()  # as the Makefile sets it
CONF = REPO / "conf"
SVG = "{http://www.w3.org/2000/svg}"

# The tiny-run settings, defined once: the random-weight tiny Llama (`conf/model/tiny_llama.yaml`), quick
# evaluation on 2 windows; CALIB: 4 calibration windows of 64 tokens from PTB's test split; SMALL: both,
# with PPL on 4 PTB windows of 64 tokens (runs that calibrate, patch and evaluate in a few seconds).
TINY = ["model=tiny_llama", "eval=quick", "eval.ppl.max_windows=2", "eval.ppl.progress=false"]
CALIB = ["calib.corpus=ptb", "calib.split=test", "calib.nsamples=4", "calib.seqlen=64", "calib.batch_size=2"]
SMALL = ["model=tiny_llama", "eval=quick", "eval.ppl.progress=false", *CALIB, "eval.ppl.datasets=[ptb]",
         "eval.ppl.seqlen=64", "eval.ppl.max_windows=4"]
ENV = {**os.environ, "LP_DATA_DIR": str(DATA), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # for `run.py` children


def need_data() -> Path:
    """The data mirror, or this test fails with one line saying how to provide it."""
    if not DATA.is_dir():
        pytest.fail(f"data mirror {DATA} not found: put shared/ beside the clone or set LP_DATA_DIR", pytrace=False)
    return DATA


def cli(*args, env=None, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """`python run.py args...` in `cwd` (one thread, data from the mirror), output captured."""
    need_data()
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def make_cfg(tmp_path: Path, overrides: list[str] = ()):
    """Compose `conf/config.yaml` with `overrides`, writing into `tmp_path`, reading the mirror."""
    need_data()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", f"data.root={DATA}", *overrides])


def svg_charts(html: str) -> list[ET.Element]:
    """The inline ``<svg>`` charts of a dashboard page, each parsed as XML (so each is well-formed;
    the xlink namespace the page leaves out is declared again for the parser)."""
    xlink = '<svg xmlns:xlink="http://www.w3.org/1999/xlink" '
    return [ET.fromstring(s.replace("<svg ", xlink, 1)) for s in re.findall(r"<svg\b.*?</svg>", html, re.S)]


def svg_texts(chart: ET.Element) -> list[str]:
    """Every ``<text>`` of a chart (titles, axis labels, tick labels, legend entries, annotations)."""
    return ["".join(t.itertext()) for t in chart.iter(SVG + "text")]


def svg_chart(charts: list[ET.Element], title: str) -> ET.Element:
    """The one chart whose title (a ``<text>``) is ``title``."""
    (chart,) = [c for c in charts if title in svg_texts(c)]
    return chart


def svg_shapes(chart: ET.Element, gid: str) -> int:
    """Number of drawn shapes (``<path>``/``<use>``) in the group with id ``gid``; -1 when absent."""
    def drawn(e: ET.Element) -> int:  # shapes under <defs> are templates that <use> draws
        return (e.tag in (SVG + "path", SVG + "use")) + sum(drawn(c) for c in e if c.tag != SVG + "defs")

    group = chart.find(f".//{SVG}g[@id='{gid}']")
    return -1 if group is None else drawn(group)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """A cache root for this test session, shared by its pytest-xdist workers (lp's cache locking makes
    concurrent builders of one entry safe, as for parallel sweep jobs). Converted models already in the
    user's cache are linked in read-only use (not converted again); everything else (calibration
    statistics, scores, teacher logits, new conversions) is written here, never into the user's cache."""
    from filelock import FileLock

    user = Path(os.environ.get("LP_CACHE_DIR") or Path.home() / ".cache" / "lp")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder above the workers' own
    root = base / "lpcache"
    with FileLock(str(base / "lpcache.lock")):
        if not root.is_dir():
            (root / "models").mkdir(parents=True)
            for model in sorted((user / "models").iterdir()) if (user / "models").is_dir() else []:
                if model.is_dir() and not model.name.startswith("."):
                    (root / "models" / model.name).symlink_to(model.resolve(), target_is_directory=True)
    return root


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    """Every test reads and writes the session cache (`LP_CACHE_DIR`); tests that need an empty
    cache set their own."""
    monkeypatch.setenv("LP_CACHE_DIR", str(session_cache))


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores (`runtime.threads=auto` and torch read
    OMP_NUM_THREADS): workers that each spin all cores collapse, as parallel sweep jobs would."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))

