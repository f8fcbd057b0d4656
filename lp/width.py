"""Width surgery on Hugging Face decoders: remove attention KV groups and MLP channels, save stock.

Units (per decoder layer, Llama/Qwen2/Mistral/Gemma-style `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj`):
  * a *KV group* g: key/value head g and the `num_attention_heads / num_key_value_heads` query heads
    that read it (rows of q/k/v, their biases, columns of o_proj). Removing whole groups keeps the
    GQA ratio, so `head_dim` and `num_key_value_groups` are unchanged and the stock attention forward
    (heads inferred from the projection width) runs as is. For MHA a group is one head.
  * an *MLP channel* c: row c of gate_proj and up_proj (and their biases), column c of down_proj.

`WidthPlan` holds, per pruned dense layer, the kept groups and channels. Every pruned layer keeps the
same counts, so the model has at most two layer shapes: dense (unpruned layers) and pruned.

Saving (stock `from_pretrained`, no custom code): a Llama/Qwen2 config has ONE head count and ONE
intermediate size for all layers, so
  * when every layer is pruned (`keep_first = keep_last = 0`), the config gets the pruned sizes and
    the checkpoint is compact;
  * otherwise (LLM-Pruner's block-wise layout: dense first/last layers) the checkpoint keeps the
    dense config and stores each removed group/channel as zeros in its dense slot. The reloaded model
    computes the same function (a zero group's output and a zero channel's output are exactly 0) but
    holds dense-size tensors; `config.lp_width_pruning` records the layout and the real counts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lp.models import Decoder

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def check_family(family) -> None:
    """Whether width surgery applies to a model family (`lp.families.Family`): separate q/k/v/o projections
    under `self_attn` and gate/up/down under `mlp`, the names this module edits; a one-line ValueError if not."""
    if family.attn != ATTN or family.mlp != MLP or (family.attn_module, family.mlp_module) != ("self_attn", "mlp"):
        raise ValueError(f"width pruning edits self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj; the {family.name} "
                         f"family has attention projections {family.attn} and MLP projections {family.mlp} "
                         "(lp/families): not supported")


@dataclass(frozen=True)
class Geometry:
    """Dense sizes of one decoder layer and the parameter count of one unit."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params_group: int  # parameters of one KV group (q/k/v rows + biases, o columns)
    params_channel: int  # parameters of one MLP channel (gate/up rows + biases, down column)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def params_prunable(self) -> int:
        return self.kv_heads * self.params_group + self.intermediate * self.params_channel


def modules(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """`(self_attn, mlp)` of a decoder layer; TypeError for layouts this surgery does not know."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    ok = attn is not None and mlp is not None and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN) \
        and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP)
    if not ok:
        raise TypeError(f"width pruning needs self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj Linear "
                        f"layers (Llama/Qwen2/Mistral/Gemma style); {type(layer).__name__} has another layout")
    return attn, mlp


def geometry(layer: nn.Module) -> Geometry:
    """Sizes of `layer` read from its weights (not the config, which may be dense after pruning)."""
    attn, mlp = modules(layer)
    hd = attn.head_dim
    heads, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    if heads % kv:
        raise ValueError(f"{heads} query heads are not a multiple of {kv} KV heads")
    d = attn.q_proj.in_features
    bias = lambda lin: lin.bias is not None  # noqa: E731
    pg = (heads // kv) * hd * (d + bias(attn.q_proj)) + hd * (d + bias(attn.k_proj)) \
        + hd * (d + bias(attn.v_proj)) + (heads // kv) * hd * d
    pc = 2 * d + bias(mlp.gate_proj) + bias(mlp.up_proj) + d
    return Geometry(heads, kv, hd, mlp.gate_proj.out_features, pg, pc)


def unit_rows(g: Geometry, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q/o index, k/v index) of the projection rows (q,k,v) / columns (o) of KV groups `groups`."""
    q = [(grp * g.group_size + h) * g.head_dim + j for grp in groups for h in range(g.group_size)
         for j in range(g.head_dim)]
    kv = [grp * g.head_dim + j for grp in groups for j in range(g.head_dim)]
    return torch.tensor(q, dtype=torch.long), torch.tensor(kv, dtype=torch.long)


def _slice(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` of `lin`'s output (dim 0) or input (dim 1) features, in place."""
    index = index.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, index).clone(), requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[index].clone(), requires_grad=lin.bias.requires_grad)
        lin.out_features = len(index)
    else:
        lin.in_features = len(index)


@dataclass
class WidthPlan:
    """Kept KV groups and MLP channels (sorted, indices into the dense layer) per pruned dense layer."""

    groups: dict[int, list[int]]
    channels: dict[int, list[int]]
    num_layers: int
    dense: dict = field(default_factory=dict)  # dense geometry, filled by `apply`

    @property
    def all_layers(self) -> bool:
        return sorted(self.groups) == list(range(self.num_layers))

    def apply(self, model: nn.Module) -> nn.Module:
        """Prune `model` in place (layer numbering must still be dense); sets config sizes when every
        layer is pruned (then the config describes every layer again)."""
        dec = Decoder(model)
        if dec.num_layers != self.num_layers:
            raise ValueError(f"plan is for {self.num_layers} layers, model has {dec.num_layers}")
        for i in sorted(self.groups):
            layer = dec.layers[i]
            g = geometry(layer)
            self.dense = self.dense or {"heads": g.heads, "kv_heads": g.kv_heads, "head_dim": g.head_dim,
                                        "intermediate": g.intermediate}
            attn, mlp = modules(layer)
            q, kv = unit_rows(g, self.groups[i])
            for lin, idx, dim in ((attn.q_proj, q, 0), (attn.k_proj, kv, 0), (attn.v_proj, kv, 0), (attn.o_proj, q, 1)):
                _slice(lin, idx, dim)
            ch = torch.tensor(self.channels[i], dtype=torch.long)
            for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
                _slice(lin, ch, dim)
            for obj, key, value in ((attn, "num_heads", len(self.groups[i]) * g.group_size),
                                    (attn, "num_key_value_heads", len(self.groups[i])),
                                    (mlp, "intermediate_size", len(self.channels[i]))):
                if hasattr(obj, key):
                    setattr(obj, key, value)
        if self.all_layers:
            self._set_config(model.config)
        return model

    def _set_config(self, config) -> None:
        kept_g, kept_c = {len(v) for v in self.groups.values()}, {len(v) for v in self.channels.values()}
        if len(kept_g) != 1 or len(kept_c) != 1:
            raise ValueError("a config can only describe equal counts in every layer")
        kv = kept_g.pop()
        config.head_dim = self.dense["head_dim"]  # explicit: hidden / heads no longer gives it
        config.num_attention_heads = kv * (self.dense["heads"] // self.dense["kv_heads"])
        config.num_key_value_heads = kv
        config.intermediate_size = kept_c.pop()

    def record(self) -> dict:
        """JSON-able summary (written into result.json and the saved config)."""
        first = min(self.groups) if self.groups else None
        return {"layers": sorted(self.groups), "dense": self.dense,
                "kv_groups_kept": len(self.groups[first]) if self.groups else None,
                "channels_kept": len(self.channels[first]) if self.groups else None,
                "storage": "compact" if self.all_layers else "dense_zero_padded"}

    def stock_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """State dict in the shapes of `model.config` (dense slots with zeros where units were removed);
        the state dict itself when every layer is pruned (the config then matches)."""
        sd = model.state_dict()
        if self.all_layers:
            return sd
        dense = self.dense
        g = Geometry(dense["heads"], dense["kv_heads"], dense["head_dim"], dense["intermediate"], 0, 0)
        prefix = {id(layer): name for name, layer in model.named_modules()}
        dec = Decoder(model)
        for i in self.groups:
            attn, mlp = modules(dec.layers[i])
            q, kv = unit_rows(g, self.groups[i])
            ch = torch.tensor(self.channels[i], dtype=torch.long)
            full = {"q_proj": g.heads * g.head_dim, "k_proj": g.kv_heads * g.head_dim,
                    "v_proj": g.kv_heads * g.head_dim, "o_proj": g.heads * g.head_dim,
                    "gate_proj": g.intermediate, "up_proj": g.intermediate, "down_proj": g.intermediate}
            for owner, name, idx, dim in ((attn, "q_proj", q, 0), (attn, "k_proj", kv, 0), (attn, "v_proj", kv, 0),
                                          (attn, "o_proj", q, 1), (mlp, "gate_proj", ch, 0), (mlp, "up_proj", ch, 0),
                                          (mlp, "down_proj", ch, 1)):
                lin = getattr(owner, name)
                key = f"{prefix[id(lin)]}."
                sd[key + "weight"] = _pad(lin.weight.detach(), idx, dim, full[name])
                if lin.bias is not None and dim == 0:
                    sd[key + "bias"] = _pad(lin.bias.detach(), idx, 0, full[name])
        return sd

    def save(self, model: nn.Module, tokenizer, path, meta: dict | None = None) -> Path:
        """Write a folder that stock `AutoModelForCausalLM.from_pretrained` reloads as the same function
        (see the module docstring), via a temporary sibling folder renamed into place when complete."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not (path / "config.json").is_file():
            raise FileExistsError(f"{path} exists and is not a saved model folder; not overwriting it")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        record = {**self.record(), **(meta or {})}
        had = getattr(model.config, "lp_width_pruning", None)
        model.config.lp_width_pruning = json.loads(json.dumps(record, default=str))
        try:
            model.save_pretrained(tmp, state_dict=self.stock_state_dict(model))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            model.config.lp_width_pruning = had
            if had is None:
                del model.config.lp_width_pruning
        return path


def _pad(t: torch.Tensor, index: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` scattered into zeros with `size` entries along `dim` at positions `index`."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.index_copy_(dim, index.to(t.device), t)
    return out
