"""SmolLM3: Llama layout; `no_rope_layers` lists, per layer, whether it uses rotary embeddings."""

from lp.families.base import Family

FAMILY = Family(name="smollm3", model_types=("smollm3",), per_layer_keys=("layer_types", "no_rope_layers"))
