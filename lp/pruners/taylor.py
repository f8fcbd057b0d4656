"""`pruner=taylor`: the Taylor+ criterion of Shortened LLaMA.

Kim et al., "Shortened LLaMA: Depth Pruning for Large Language Models with Comparison of
Retraining Methods" (2024). The first-order Taylor estimate of the loss change when a weight is
zeroed, |L(W) - L(W=0)| ~ |dL/dW * W|, summed over all parameters of a decoder block:

    I_l = sum_{W in params(layer l)} sum_ij | W_ij * dL/dW_ij |,
    L   = 1/N sum_w 1/(T-1) sum_t -log p(x_w[t+1] | x_w[<=t])   (calibration LM loss).

The n blocks with the lowest I_l are removed at once. The "+" is the paper's heuristic of never
removing the first four and the last two blocks: candidates are dense layers 4..L-3, so
1 <= n <= L-6; the excluded layers are reported as null. Layer indices are dense (0..L-1).

dL/dW is the gradient of the loss over the *whole* calibration set, i.e. the sum of the
micro-batch gradients (each micro-batch loss is its windows' share, sum_{w in batch} ... / N); the
absolute value is taken only after summing, so a layer's whole float32 gradient sum must exist
before its score can be taken. Each micro-batch's gradient is added into a float32 accumulator by a
post-accumulate-grad hook that then frees `.grad`, so model-dtype gradients are freed as soon as
backward has produced them (no full set of `.grad`s is ever held).

Layer by layer (`pruner.layers_per_pass`; default `auto`: as many layers per pass as fit in half the free
memory, usually all of them on a model that fits with room to spare): one pass over the calibration windows per
group of k candidate layers, from the top down; only that group's parameters require grad, so only
its float32 accumulators exist, backward stops at its lowest layer, and once the pass ends each
layer is reduced to its score and its accumulators freed. `layers_per_pass: null` scores every
candidate in one pass (fastest, most memory). The scores are the same either way (the same
micro-batch gradients summed in the same order; tested to 1e-6 relative).

Memory: weights + k layers' float32 accumulators + the saved activations of one micro-batch of the
layers from the group up + the logits. Llama-2-13B (fp16, 40 blocks of 0.318 B params, 34
candidates), seqlen 2048, micro-batch 1: 26 GB weights + 1.3 GB (k = 1) + ~18 GB activations (~0.5 GB
per block in fp16, logits 32000 x 2048 in fp32 0.26 GB) = ~45 GB, on one 80 GB GPU; all candidates
in one pass would add 34 x 1.27 = 43 GB of accumulators instead (~87 GB: out of memory).
Cost: one forward per group and a backward from the top to the group; k = 1 on 34 candidates is
~34 forwards + ~17 full backwards per calibration window instead of one of each (~15x the time of
one pass); raise k where memory allows. Gradients of a bf16 model are bf16 per micro-batch before
the fp32 sum. The model is left as found: weights, `requires_grad` flags, existing `.grad`s and
train/eval mode.
The scores do not depend on n: with `disk_cache: true` they are stored and reused by runs with any n
(see `lp.pruners.base.ScoreCache`).
"""

from __future__ import annotations

import logging
import time

import torch

from lp.devices import input_device
from lp.evaluate.ppl import token_nll
from lp.models import Decoder
from lp.progress import bar
from lp.pruners.base import PruneContext, ScoreCache, Selection, check_flag, check_n, per_layer

log = logging.getLogger(__name__)

KEEP_FIRST, KEEP_LAST = 4, 2


def taylor_scores(model, windows: torch.Tensor, layers: list[int], micro_batch: int = 1,
                  progress: bool = False, layers_per_pass: int | None = 1) -> dict[int, float]:
    """`{layer: sum |W * dL/dW|}` over the parameters of each dense layer in `layers`, with L the mean
    per-window next-token NLL of `windows` `[N, T]`, accumulated over micro-batches in float32,
    `layers_per_pass` layers' gradients at a time (None: all at once; see the module docstring)."""
    dec = Decoder(model)

    def score(i: int, grads: dict) -> float:
        return sum((grads.pop(p) * p.detach().float()).abs_().sum().item() for p in dec.layers[i].parameters())

    return per_layer_pass(model, windows, {i: list(dec.layers[i].parameters()) for i in layers}, score,
                          layers_per_pass, micro_batch, progress, "taylor gradients")


def check_layers_per_pass(pruner: str, value) -> int | str | None:
    """`pruner.layers_per_pass`: "auto", an integer >= 1 or null (all scored layers in one pass)."""
    if value != "auto" and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"pruner={pruner}: pruner.layers_per_pass={value!r} must be auto, an integer >= 1 or null "
                         "(every scored layer in one pass)")
    return value


def auto_layers_per_pass(params: dict[int, list], share: float = 0.5) -> int | None:
    """"auto": as many layers per pass as their float32 gradient sums fit in `share` of the memory free
    where the layers' weights live (GPU: `torch.cuda.mem_get_info`; CPU: MemAvailable); None (one pass)
    when every scored layer fits. Fewer passes are faster: each pass is a forward + backward over all windows."""
    sizes = {i: sum(p.numel() for p in ps) * 4 for i, ps in params.items()}
    device = next((p.device for ps in params.values() for p in ps if p.device.type != "meta"), torch.device("cpu"))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_host_bytes()
    k = int(share * free // max(sizes.values(), default=1))
    k = None if k >= len(params) else max(k, 1)
    log.info("layers_per_pass=auto: %s (%.1f GB free on %s, %.2f GB float32 sums per layer)",
             "all in one pass" if k is None else k, free / 2**30, device, max(sizes.values(), default=0) / 2**30)
    return k


def resolve_layers_per_pass(value, model, layers: list[int]) -> int | None:
    """`pruner.layers_per_pass` for scoring dense `layers` of `model`: "auto" resolved (`auto_layers_per_pass`)."""
    if value != "auto":
        return value
    dec = Decoder(model)
    return auto_layers_per_pass({i: list(dec.layers[i].parameters()) for i in layers})


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def passes_over(layers: int, layers_per_pass: int | None) -> int:
    """Passes over the calibration windows `per_layer_pass` makes for `layers` scored layers."""
    return 1 if layers_per_pass is None else -(-layers // layers_per_pass)


def per_layer_pass(model, windows: torch.Tensor, params: dict[int, list], reduce, layers_per_pass: int | None,
                   micro_batch: int = 1, progress: bool = False, desc: str = "gradients") -> dict:
    """`{layer: reduce(layer, grads)}` for the dense layers in `params` (layer -> its parameters to
    differentiate), where `grads` maps each of the group's parameters to dL/dparam (float32, summed
    over all windows; `reduce` may pop them). One pass over `windows` per group of `layers_per_pass`
    layers (None: one group), the highest layers first; a group's gradients are freed when reduced."""
    order = sorted(params, reverse=True)
    k = len(order) if layers_per_pass is None else layers_per_pass
    out = {}
    for g, start in enumerate(range(0, len(order), max(k, 1))):
        group = order[start:start + k]
        label = desc if len(order) <= k else f"{desc} (layers {min(group)}-{max(group)}, pass {g + 1})"
        grads = loss_grads(model, windows, [p for i in group for p in params[i]], micro_batch, progress, label)
        for i in group:
            out[i] = reduce(i, grads)
        del grads
    return {i: out[i] for i in sorted(out)}


def loss_grads(model, windows: torch.Tensor, params: list, micro_batch: int = 1, progress: bool = False,
               desc: str = "taylor gradients") -> dict:
    """`{param: dL/dparam}` (float32, the param's shape) for each of `params`, L the mean per-window
    next-token NLL of `windows` `[N, T]`: the sum of the micro-batch gradients, each added into a
    float32 accumulator as soon as backward produced it (see the module docstring for memory)."""
    device = input_device(model)
    acc = {p: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params}  # beside each weight
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    was_training = model.training
    n = len(windows)

    def add(p):
        acc[p].add_(p.grad)
        p.grad = None

    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in acc:
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(add))
        model.eval()
        with torch.enable_grad():
            for i in bar(range(0, n, micro_batch), progress, desc, unit="batch"):
                ids = windows[i:i + micro_batch].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = sum(token_nll(lg[:-1], t[1:]).mean() for lg, t in zip(logits, ids, strict=True)) / n
                loss.backward()
                del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = old_grads.get(p)
        model.train(was_training)
    return acc


class TaylorPruner:
    name = "taylor"
    needs_calibration = True
    needs_weight_grads = True  # backward into the weights: not with offloaded layers (lp.devices)

    def __init__(self, n: int = 5, micro_batch: int = 1, disk_cache: bool = True, layers_per_pass: int | str | None = "auto"):
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"pruner=taylor: pruner.micro_batch={micro_batch!r} must be an integer >= 1")
        self.n = n
        self.micro_batch = micro_batch
        self.layers_per_pass = check_layers_per_pass(self.name, layers_per_pass)
        self.disk_cache = check_flag(self.name, "disk_cache", disk_cache)

    def check(self, num_layers: int) -> None:
        check_n(self.name, self.n, num_layers - KEEP_FIRST - KEEP_LAST,
                f"Taylor+ never removes the first {KEEP_FIRST} and last {KEEP_LAST} of the model's "
                f"{num_layers} layers")

    def select(self, ctx: PruneContext) -> Selection:
        L = Decoder(ctx.model).num_layers
        self.check(L)
        disk = ScoreCache(ctx, self.name, self.disk_cache, micro_batch=self.micro_batch)
        stored = disk.load()
        hit, passes, seconds = stored is not None, 0, 0.0
        if not hit:
            windows = ctx.windows  # built (tokenized) before the clock starts
            t0 = time.perf_counter()
            layers = list(range(KEEP_FIRST, L - KEEP_LAST))
            k = resolve_layers_per_pass(self.layers_per_pass, ctx.model, layers)
            scores = taylor_scores(ctx.model, windows, layers, self.micro_batch, ctx.progress, k)
            passes = -(-len(windows) // self.micro_batch) * passes_over(len(layers), k)
            seconds = time.perf_counter() - t0
            stored = {"scores": per_layer(scores, L)}
            disk.save(stored)
        values = stored["scores"]
        removed = sorted(range(KEEP_FIRST, L - KEEP_LAST), key=lambda i: (values[i], i))[: self.n]
        info = {
            "scores": {"kind": "taylor_abs_w_grad", "values": values},
            "order": removed,
            "backward_passes": passes,
            "disk_cache": disk.info(hit=hit),
            "time_s": round(seconds, 3),
        }
        return Selection(removed, info)
