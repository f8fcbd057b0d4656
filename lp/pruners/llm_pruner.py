"""`pruner=llm_pruner`: LLM-Pruner (Ma et al., NeurIPS 2023), block-wise width pruning, no recovery.

Removes whole attention KV groups and MLP intermediate channels (units: see `lp.width`) instead of
layers. Importance is LLM-Pruner's first-order Taylor term, element-wise ("param_first") with the
"sum" group reduction:

    I(unit) = sum_{w in the unit's weights and biases} | w * dL/dw |,
    L = 1/N sum_w 1/(T-1) sum_t -log p(x_w[t+1] | x_w[<=t])   (calibration LM loss),

dL/dw summed over micro-batches in float32 before the absolute value (`taylor.loss_grads`). A KV
group's weights: its query heads' rows of q_proj, its key/value head's rows of k_proj/v_proj (and
their biases, e.g. Qwen2), its query heads' columns of o_proj. A channel's: row c of gate_proj and
up_proj, column c of down_proj.

Block-wise setting (LLM-Pruner's `--block_wise`): only dense layers [keep_first, L - keep_last) are
pruned; defaults 4 and 2 are LLM-Pruner's LLaMA-7B scripts (layer_start 4, layer_end 30 of 32) and
Taylor+'s protected layers. Every pruned layer loses the same number of units, its own least
important ones (LLM-Pruner's default local, uniform per-layer ratio), so the model has two layer
shapes; `lp.width` says how such a model is saved for stock `from_pretrained`.

`pruner.ratio`: the fraction of the pruned range's prunable parameters (attention and MLP
projections) removed; LLM-Pruner's `pruning_ratio`. `ratio: match` removes as many parameters as
removing `n` whole layers does (n x mean layer size, norms included), so the run sits in the depth
pruners' rows for that n and its `pruned_ratio` equals theirs to within a few channels. Per layer
with budget t = ratio x P_prunable: g = min(round(ratio x G), floor(t / P_group), G - 1) KV groups,
then round((t - g P_group) / P_channel) channels, so coarse GQA groups (SmolLM2-135M: 3) do not
move the ratio. At least one group and one channel always stay.

Memory: as `taylor` (`pruner.layers_per_pass`, default auto; 1: one calibration pass per layer, top
down), float32 gradient sums exist only for the projection weights of the layers of the current pass,
reduced to that layer's unit importances ([G] + [I] floats) and freed when the pass ends. Llama-2-13B
fp16: 26 GB weights + 1.27 GB (one layer) + ~18 GB activations of one 2048-token window = ~45 GB;
`layers_per_pass: null` holds all 34 pruned layers' sums at once (+43 GB). The importances do not depend on the ratio: with
`disk_cache: true` a sweep scores once.
"""

from __future__ import annotations

import math
import time

import torch

from lp.models import Decoder
from lp.pruners.base import PruneContext, ScoreCache, Selection, check_flag, check_n
from lp.pruners.taylor import check_layers_per_pass, passes_over, per_layer_pass, resolve_layers_per_pass
from lp.width import Geometry, WidthPlan, geometry, modules


def unit_importance(model, windows: torch.Tensor, layers: list[int], micro_batch: int = 1, progress: bool = False,
                    layers_per_pass: int | None = 1) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{layer: (KV-group importance [G], channel importance [I])}` (float32, CPU) for dense `layers`,
    `layers_per_pass` layers' gradients at a time (None: all at once; see the module docstring)."""
    dec = Decoder(model)
    mods = {i: modules(dec.layers[i]) for i in layers}
    lins = {i: [getattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + [getattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")] for i, (a, m) in mods.items()}

    def units(i: int, grads: dict) -> tuple[torch.Tensor, torch.Tensor]:
        def sal(lin, dim):  # per output row (dim 1 summed) or input column (dim 0 summed) of |w * g|, + bias
            s = (grads.pop(lin.weight) * lin.weight.detach().float()).abs_().sum(dim)
            if lin.bias is not None:
                b = (grads.pop(lin.bias) * lin.bias.detach().float()).abs_()
                s = s + b if dim == 1 else s  # o/down biases live in the hidden dimension: never pruned
            return s

        g = geometry(dec.layers[i])
        q, k, v, o, gate, up, down = lins[i]
        group = (sal(q, 1) + sal(o, 0)).view(g.kv_heads, -1).sum(1) \
            + (sal(k, 1) + sal(v, 1)).view(g.kv_heads, -1).sum(1)
        channel = sal(gate, 1) + sal(up, 1) + sal(down, 0)
        return group.cpu(), channel.cpu()

    params = {i: [p for lin in lins[i] for p in lin.parameters()] for i in layers}
    return per_layer_pass(model, windows, params, units, layers_per_pass, micro_batch, progress, "llm_pruner gradients")


def unit_counts(g: Geometry, ratio: float) -> tuple[int, int]:
    """(KV groups, channels) to remove per layer so that `ratio` of its prunable parameters go."""
    budget = ratio * g.params_prunable
    groups = min(round(ratio * g.kv_heads), math.floor(budget / g.params_group), g.kv_heads - 1)
    channels = round((budget - groups * g.params_group) / g.params_channel)
    return groups, max(0, min(channels, g.intermediate - 1))


def keep_top(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices of `scores` minus the `remove` lowest (ties: the higher index goes first), sorted."""
    order = sorted(range(len(scores)), key=lambda j: (float(scores[j]), -j))
    return sorted(order[remove:])


class LLMPruner:
    name = "llm_pruner"
    needs_calibration = True
    needs_weight_grads = True  # backward into the weights: not with offloaded layers (lp.devices)

    def __init__(self, ratio="match", n: int | None = 5, keep_first: int = 4, keep_last: int = 2,
                 micro_batch: int = 1, disk_cache: bool = True, layers_per_pass: int | str | None = "auto"):
        for key, value, lo in (("keep_first", keep_first, 0), ("keep_last", keep_last, 0), ("micro_batch", micro_batch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"pruner={self.name}: pruner.{key}={value!r} must be an integer >= {lo}")
        if ratio == "match":
            if n is None:
                raise ValueError(f"pruner={self.name}: pruner.ratio=match needs pruner.n (the depth pruning to match)")
        elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"pruner={self.name}: pruner.ratio={ratio!r} must be 'match' or a number in (0, 1)")
        elif n is not None:
            raise ValueError(f"pruner={self.name}: pruner.ratio={ratio} with pruner.n={n}: n only names the depth "
                             "pruning that ratio=match copies; with a numeric ratio set pruner.n=null")
        self.ratio, self.n = ratio, n
        self.keep_first, self.keep_last, self.micro_batch = keep_first, keep_last, micro_batch
        self.disk_cache = check_flag(self.name, "disk_cache", disk_cache)
        self.layers_per_pass = check_layers_per_pass(self.name, layers_per_pass)

    def layers(self, num_layers: int) -> list[int]:
        return list(range(self.keep_first, num_layers - self.keep_last))

    def check(self, num_layers: int) -> None:
        span = len(self.layers(num_layers))
        if span < 1:
            raise ValueError(f"pruner={self.name}: keep_first={self.keep_first} + keep_last={self.keep_last} leave "
                             f"no layer to prune in a {num_layers}-layer model")
        if self.ratio == "match":
            check_n(self.name, self.n, span - 1, f"ratio=match spreads n layers' parameters over the "
                    f"{span} pruned layers {self.keep_first}..{num_layers - self.keep_last - 1}, each keeping some")

    def match_ratio(self, model) -> float:
        """Fraction of the pruned range's prunable parameters that equals `n` mean-size layers."""
        dec = Decoder(model)
        mean_layer = sum(p.numel() for p in dec.layers.parameters()) / dec.num_layers
        span = self.layers(dec.num_layers)
        return self.n * mean_layer / sum(geometry(dec.layers[i]).params_prunable for i in span)

    def select(self, ctx: PruneContext) -> Selection:
        dec = Decoder(ctx.model)
        self.check(dec.num_layers)
        span = self.layers(dec.num_layers)
        geo = {i: geometry(dec.layers[i]) for i in span}
        if len(set(geo.values())) != 1:
            raise ValueError(f"pruner={self.name}: layers {span[0]}..{span[-1]} differ in shape; uniform removal "
                             "needs equal layers")
        g = geo[span[0]]
        ratio = self.match_ratio(ctx.model) if self.ratio == "match" else float(self.ratio)
        if ratio >= 1:
            raise ValueError(f"pruner={self.name}: removing {ratio:.1%} of the pruned range is impossible")
        n_groups, n_channels = unit_counts(g, ratio)
        imp, info = self.importance(ctx, span)
        plan = WidthPlan({i: keep_top(imp[i][0], n_groups) for i in span},
                         {i: keep_top(imp[i][1], n_channels) for i in span}, dec.num_layers,
                         dense={"heads": g.heads, "kv_heads": g.kv_heads, "head_dim": g.head_dim,
                                "intermediate": g.intermediate})
        removed = n_groups * g.params_group + n_channels * g.params_channel
        info.update({
            "n": self.n,  # the depth pruning this run matches (table rows); no layer is removed
            "ratio_setting": self.ratio, "ratio_range": removed / g.params_prunable,
            "pruned_layers": [span[0], span[-1] + 1],
            "kv_groups_removed_per_layer": n_groups, "channels_removed_per_layer": n_channels,
            "width": plan.record(),
        })
        return Selection([], info, width=plan)

    def importance(self, ctx: PruneContext, span: list[int]) -> tuple[dict, dict]:
        """Unit importances of the layers in `span` (from the disk cache when possible) and report info."""
        disk = ScoreCache(ctx, self.name, self.disk_cache, micro_batch=self.micro_batch, layers=span)
        stored = disk.load()
        hit, passes, seconds = stored is not None, 0, 0.0
        if hit:
            imp = {int(i): (torch.tensor(v[0]), torch.tensor(v[1])) for i, v in stored["units"].items()}
        else:
            windows = ctx.windows
            t0 = time.perf_counter()
            k = resolve_layers_per_pass(self.layers_per_pass, ctx.model, list(span))
            imp = unit_importance(ctx.model, windows, span, self.micro_batch, ctx.progress, k)
            passes = -(-len(windows) // self.micro_batch) * passes_over(len(span), k)
            seconds = time.perf_counter() - t0
            disk.save({"units": {str(i): [a.tolist(), b.tolist()] for i, (a, b) in imp.items()}})
        return imp, {"importance": "taylor |w * dL/dw| summed per KV group / channel", "backward_passes": passes,
                     "disk_cache": disk.info(hit=hit), "time_s": round(seconds, 3)}
