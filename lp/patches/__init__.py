"""The patch vocabulary: every `patch.kind` is one module of this package, registered by name.

A kind turns calibration data of the *dense* model into the D x D matrix W of a `lp.patch.LinearPatch`
bridging one cut [a, b) (h_a = stream entering dense layer a, h_b = entering layer b, h_L = last
layer's output before the final norm; row vectors, the patch computes x -> x W on h_a, or, for the
"mlp"-site kinds lstsq_mlp / rotate_mlp, on the MLP output of layer a-1: `PatchKind.site`). Adding a kind =
one module here with a `@register`ed `PatchKind` subclass + one `conf/patch/<kind>.yaml` (whose `defaults`
list the shared `conf/patch/_<part>.yaml` files: those are not kinds).

`auto` is not a kind but a choice among kinds (`lp.verify`), listed in `CHOICES` beside them.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from lp.patches.base import Fit, FitSource, PatchKind

KINDS: dict[str, PatchKind] = {}
CHOICES = ("auto",)  # patch.kind values that are not a kind themselves: choose per cut by held-out NLL


def register(cls: type[PatchKind]) -> type[PatchKind]:
    """Class decorator: make `cls.name` a valid `patch.kind`."""
    if cls.name in KINDS or cls.name in CHOICES:
        raise ValueError(f"patch kind {cls.name!r} registered twice")
    KINDS[cls.name] = cls()
    return cls


def get(name: str) -> PatchKind:
    """The registered kind `name`; an unknown name raises with the valid ones and a "did you mean"."""
    check_name(name, "patch.kind", allow_choice=False)
    return KINDS[name]


def check_name(name, key: str = "patch.kind", allow_choice: bool = True) -> None:
    valid = [*KINDS, *CHOICES] if allow_choice else list(KINDS)
    if name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key}={name!r} is not a patch kind{hint}; choose one of {valid}")


for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["CHOICES", "KINDS", "Fit", "FitSource", "PatchKind", "check_name", "get", "register"]
