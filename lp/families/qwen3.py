"""Qwen3: Llama layout with q/k norms inside attention; per-layer `layer_types`."""

from lp.families.base import Family

FAMILY = Family(name="qwen3", model_types=("qwen3",), per_layer_keys=("layer_types",), tiny={})
