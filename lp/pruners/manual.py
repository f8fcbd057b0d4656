"""`pruner=manual`: remove an explicit list of layer indices (dense numbering 0..L-1)."""

from lp.models import validate_layers
from lp.pruners.base import PruneContext, Selection


class ManualPruner:
    name = "manual"
    needs_calibration = False

    def __init__(self, layers):
        if layers is None or len(layers) == 0:
            raise ValueError("pruner=manual needs pruner.layers, e.g. pruner.layers=[20,21,22]")
        self.layers = [int(i) for i in layers]
        self.n = len(self.layers)

    def check(self, num_layers: int) -> None:
        validate_layers(self.layers, num_layers)

    def select(self, ctx: PruneContext) -> Selection:
        return Selection(self.layers, {"order": list(self.layers)})
