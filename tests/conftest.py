"""Shared test helpers: the data mirror beside the clone and a composed config for `run(cfg)`."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CONF = REPO / "conf"


def make_cfg(tmp_path: Path, overrides: list[str] = ()):
    """Compose `conf/config.yaml` with `overrides`, writing into `tmp_path`, reading the mirror."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", f"data.root={DATA}", *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))


def pytest_collection_modifyitems(config, items):
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"data mirror {DATA} not found")
        for item in items:
            if "real" in item.keywords:
                item.add_marker(skip)
