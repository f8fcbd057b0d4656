"""Standalone modeling file that `lp.export.save_pruned` copies into a saved folder (as `modeling_lp.py`).

It must not import `lp`: the folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` on a machine without lp.
Only the `BASE_MODEL_TYPE` line is rewritten when the file is copied.

The model is the base architecture (e.g. `LlamaForCausalLM`) with the pruned layer count, plus one
`LinearPatch` per cut: `config.lp_patches` lists `{"module": <path of the module the patch feeds,
e.g. "model.layers.5" or "model.norm">, "start", "end", "kind"}`. The patch lives on that module as
`<module>.lp_patch` (weight `[D, D]`, float32, key `<module>.lp_patch.weight` in the safetensors) and
a forward pre-hook multiplies the module's hidden-states input by it: x -> (x.float() @ W).to(x.dtype),
exactly as `lp.patch.LinearPatch` does in memory. All other weights keep the base architecture's names.
"""

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE_MODEL_TYPE = "llama"

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseForCausalLM = MODEL_FOR_CAUSAL_LM_MAPPING[_BaseConfig]


class LpPatchedConfig(_BaseConfig):
    """The base config plus `lp_patches` (where each patch sits)."""

    model_type = f"lp_patched_{BASE_MODEL_TYPE}"


class LinearPatch(nn.Module):
    """x -> (x.float() @ weight).to(x.dtype); weight [D, D] float32 (NaN until loaded, so a missing
    patch can never pass for a trained one)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, dim), float("nan"), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self.weight.to(device=x.device, dtype=torch.float32)).to(x.dtype)


def _apply_patch(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: patch the hidden states (first positional argument or `hidden_states`)."""
    if args:
        return (module.lp_patch(args[0]), *args[1:]), kwargs
    kwargs["hidden_states"] = module.lp_patch(kwargs["hidden_states"])
    return args, kwargs


class LpPatchedForCausalLM(_BaseForCausalLM):
    config_class = LpPatchedConfig
    _keep_in_fp32_modules_strict = ["lp_patch"]

    def __init__(self, config):
        super().__init__(config)
        for entry in config.lp_patches:
            target = self.get_submodule(entry["module"])
            target.lp_patch = LinearPatch(config.hidden_size)
            target.register_forward_pre_hook(_apply_patch, with_kwargs=True)

    def _init_weights(self, module):
        if isinstance(module, LinearPatch):
            with torch.no_grad():
                module.weight.fill_(float("nan"))
            return
        super()._init_weights(module)
