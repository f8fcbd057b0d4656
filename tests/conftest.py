"""Shared test helpers: the data mirror beside the clone and a composed config for `run(cfg)`."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LP_DATA_DIR") or REPO.parent / "shared" / "data").resolve()  # as the Makefile sets it
CONF = REPO / "conf"


def make_cfg(tmp_path: Path, overrides: list[str] = ()):
    """Compose `conf/config.yaml` with `overrides`, writing into `tmp_path`, reading the mirror."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={tmp_path}", f"data.root={DATA}", *overrides])


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: make_cfg(tmp_path, list(overrides))


def pytest_configure(config):
    if not DATA.is_dir():
        raise pytest.UsageError(f"data mirror {DATA} not found: put shared/ beside the clone or set LP_DATA_DIR")
