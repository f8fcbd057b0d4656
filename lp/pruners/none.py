"""`pruner=none`: the dense model, nothing removed (`n: 0`, so grid presets that set `pruner.n`
compose with it as the launching config)."""

from lp.pruners.base import PruneContext, Selection


class NoPruner:
    name = "none"
    needs_calibration = False

    def __init__(self, n: int = 0):
        if isinstance(n, bool) or n != 0:
            raise ValueError(f"pruner=none removes nothing: pruner.n={n!r} must be 0; "
                             "choose a pruner that removes layers, e.g. pruner=shortgpt")
        self.n = 0

    def check(self, num_layers: int) -> None:
        pass

    def select(self, ctx: PruneContext) -> Selection:
        return Selection([])
