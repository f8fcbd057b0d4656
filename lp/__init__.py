"""lp: layer pruning of causal LMs with LinearPatch. `lp.load_pruned(path)` reloads a saved pruned model."""

__all__ = ["load_pruned"]


def __getattr__(name):  # lazy: `import lp` stays light (no torch) until load_pruned is used
    if name == "load_pruned":
        from lp.export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'lp' has no attribute {name!r}")
