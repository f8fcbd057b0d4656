"""Qwen2 / Qwen2.5 (and DeepSeek-R1-Distill-Qwen): Llama layout with q/k/v biases; per-layer `layer_types`."""

from lp.families.base import Family

FAMILY = Family(name="qwen2", model_types=("qwen2",), per_layer_keys=("layer_types",), tiny={})
