"""`patch=none`: no patch; the pruned stream h_a goes straight into the first kept module after the cut."""

from lp.patches import register
from lp.patches.base import Fit, PatchKind


@register
class NoPatch(PatchKind):
    name = "none"
    paper = "plain layer removal (no compensation)"
    foldable = True

    def fit(self, source, a, b) -> Fit:
        return Fit(None)
