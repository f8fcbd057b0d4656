"""The pruning methods, defined once: for each pruner its display label and whether it prunes width.

Keyed by the pruner's name = its ``conf/pruner/<name>.yaml`` = ``pruner.name`` = ``pruning.method``
in result.json (tests check that the keys match the conf folder exactly). Read by the pipeline
(:func:`lp.run.pruning_info` records the label; :mod:`lp.validate` and :func:`lp.run.check_model`
ask whether a pruner prunes width), the sweeper (width pruners get no patch jobs) and the reports
(row labels; the ``Pruned %`` column of width-pruned rows). Imports nothing, so the report code
reads it without torch.
"""

from __future__ import annotations

from typing import NamedTuple


class Method(NamedTuple):
    label: str  # display name in tables, charts and logs
    width: bool = False  # removes attention heads / MLP channels, not layers: no cut for a patch to bridge


# `linearpatch` without a patch is the paper's block selection; its patched row reads "+LinearPatch".
PRUNERS: dict[str, Method] = {
    "none": Method("Dense"),
    "manual": Method("Manual"),
    "shortgpt": Method("ShortGPT"),
    "streamline": Method("LLM-Streamline"),
    "sleb": Method("SLEB"),
    "taylor": Method("Taylor+"),
    "angular": Method("Angular (Gromov)"),
    "ppl": Method("PPL"),
    "linearpatch": Method("LinearPatch block"),
    "llm_pruner": Method("LLM-Pruner", width=True),
}


def label(name: str) -> str:
    """Display label of pruner ``name`` (an unknown name, e.g. a pruner from outside lp, as is)."""
    return PRUNERS[name].label if name in PRUNERS else name


def prunes_width(name: str) -> bool:
    """Whether pruner ``name`` removes heads/channels instead of layers (False for an unknown name)."""
    return name in PRUNERS and PRUNERS[name].width
