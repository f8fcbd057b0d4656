"""Shared test helpers: the data mirror beside the clone, a composed config for `run(cfg)` and the
dashboard's inline SVG charts, parsed."""

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LP_DATA_DIR") or REPO.parent / "shared" / "data").resolve()  # as the Makefile sets it
CONF = REPO / "conf"
SVG = "{http://www.w3.org/2000/svg}"


def make_cfg(tmp_path: Path, overrides: list[str] = ()):
    """Compose `conf/config.yaml` with `overrides`, writing into `tmp_path`, reading the mirror."""
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
    """A cache root for this test session. Converted models already in the user's cache are linked
    in read-only use (not converted again); everything else (calibration statistics, scores,
    teacher logits, new conversions) is written here, never into the user's cache."""
    user = Path(os.environ.get("LP_CACHE_DIR") or Path.home() / ".cache" / "lp")
    root = tmp_path_factory.mktemp("lpcache")
    if (user / "models").is_dir():
        (root / "models").mkdir()
        for model in sorted((user / "models").iterdir()):
            if model.is_dir() and not model.name.startswith("."):
                (root / "models" / model.name).symlink_to(model.resolve(), target_is_directory=True)
    return root


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    """Every test reads and writes the session cache (`LP_CACHE_DIR`); tests that need an empty
    cache set their own."""
    monkeypatch.setenv("LP_CACHE_DIR", str(session_cache))


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))


def pytest_configure(config):
    if not DATA.is_dir():
        raise pytest.UsageError(f"data mirror {DATA} not found: put shared/ beside the clone or set LP_DATA_DIR")
