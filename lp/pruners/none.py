"""`pruner=none`: the dense model, nothing removed."""

from lp.pruners.base import PruneContext, Selection


class NoPruner:
    name = "none"
    n = 0

    def check(self, num_layers: int) -> None:
        pass

    def select(self, ctx: PruneContext) -> Selection:
        return Selection([])
