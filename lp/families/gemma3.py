"""Gemma 2 / Gemma 3 (text): sandwich norms (the attention and MLP outputs are normalised before the
residual add: `post_attention_layernorm`, `post_feedforward_layernorm`), scaled embeddings, alternating
sliding / full attention (`layer_types`), final logit soft-capping (Gemma 2)."""

from lp.families.base import Family

FAMILY = Family(
    name="gemma3", model_types=("gemma3_text", "gemma2"), per_layer_keys=("layer_types",),
    pre_norms=("input_layernorm", "pre_feedforward_layernorm"),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    logit_softcap_key="final_logit_softcapping",
    tiny={"sliding_window": 8, "layer_types": "alternate:3"},  # every third layer full attention
)
