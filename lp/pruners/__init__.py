"""Layer-selection methods. One module per method; each is a Hydra `_target_` in `conf/pruner/`.

A pruner is a small object following `lp.pruners.base.Pruner`: `name` (its display label and
whether it prunes width are in `lp.methods`, keyed by it), `n`, `needs_calibration` and
  * `check(num_layers)`: validate its settings against the dense model's layer count *before*
    any weights load (raises ValueError naming the method's constraint);
  * `select(ctx) -> Selection`: choose the layers to remove (dense numbering 0..L-1).
Methods that need calibration data read it lazily from the `PruneContext`, so `none` and
`manual` never touch a corpus.
"""

from lp.pruners.base import PruneContext, Pruner, Selection

__all__ = ["PruneContext", "Pruner", "Selection"]
