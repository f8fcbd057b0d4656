"""What lp must know of a model family, in one object (`Family`); one module per family fills it in.

Paths are dotted attribute paths from the `...ForCausalLM` module (`model.layers`) or from one decoder
layer (`self_attn.o_proj`). Conventions of `lp.models` hold for every family: `layers` is an
`nn.ModuleList` of decoder layers whose first argument/output is the residual stream `[B, T, D]`, `norm` the
final norm before the LM head (`get_output_embeddings()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One model family. `model_types`: the `config.model_type` values it covers. `per_layer_keys`:
    top-level config lists with one entry per decoder layer (subset when layers are dropped).
    `attn` / `mlp`: the projections width surgery edits (q, k, v, o / gate, up, down), under
    `attn_module` / `mlp_module`; None when this family's layout does not allow it (e.g. a fused qkv).
    `stream_writers`: the modules of a layer that add to the residual stream (a scalar patch folds into
    them). `pre_norms`: the norms inside a layer that only read the stream; `post_norms`: norms applied to
    a block's output *before* the residual add (Gemma 2/3), which change what a fold may do.
    `logit_softcap_key`: the config key of final logit soft-capping (Gemma 2/3), if any.
    `tiny`: config overrides for a random tiny model of this family (`lp.models.tiny_model`), or None."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    norm: str = "model.norm"
    per_layer_keys: tuple[str, ...] = ()
    attn_module: str = "self_attn"
    mlp_module: str = "mlp"
    attn: tuple[str, str, str, str] | None = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    stream_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    pre_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    post_norms: tuple[str, ...] = ()
    logit_softcap_key: str | None = None
    tiny: dict | None = field(default=None, hash=False)
    trust_remote_code: bool = False  # the family's modeling code lives in the checkpoint (hub `auto_map`)
