"""Model families: one module each (`lp/families/<name>.py` defining `FAMILY`), collected here.

`get(model_type)` -> the `lp.families.base.Family` for a `config.model_type`; an unknown type is one
`ValueError` naming the known ones (with "did you mean"). Adding a family = one file here + a tiny-model
test (`tests/test_families.py` runs every family that has a `tiny` config through drop and replay).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from lp.families.base import Family

FAMILIES: dict[str, Family] = {}  # family name -> Family
BY_MODEL_TYPE: dict[str, Family] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        _fam = importlib.import_module(f"{__name__}.{_info.name}").FAMILY
        FAMILIES[_fam.name] = _fam
        BY_MODEL_TYPE.update({t: _fam for t in _fam.model_types})


def get(model_type: str | None) -> Family:
    """The family of `config.model_type`; ValueError naming the known model types if there is none."""
    fam = BY_MODEL_TYPE.get(str(model_type))
    if fam is None:
        known = sorted(BY_MODEL_TYPE)
        close = difflib.get_close_matches(str(model_type), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model_type={model_type!r} is not a model family lp knows{hint}; known: {known} "
                         "(add one: a file in lp/families/)")
    return fam


def of(model) -> Family:
    """The family of a loaded model (or of a config: anything with `.model_type` or `.config.model_type`)."""
    config = getattr(model, "config", model)
    return get(getattr(config, "model_type", None))


def tiny_arches() -> list[str]:
    """The model types with a tiny random-model config (`model.tiny.arch`)."""
    return [fam.model_types[0] for fam in FAMILIES.values() if fam.tiny is not None]


__all__ = ["FAMILIES", "Family", "get", "of", "tiny_arches"]
