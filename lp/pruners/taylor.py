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
absolute value is taken only after summing. Each micro-batch's gradient is added into a float32
accumulator by a post-accumulate-grad hook that then frees `.grad`, so model-dtype gradients are
freed as soon as backward has produced them (no full set of `.grad`s is ever held). Only the candidate layers' parameters require
grad (embedding, LM head, final norm and the protected layers do not), so backward stops at
layer 4. Memory: weights + float32 accumulators of the candidate layers + the saved activations of
one micro-batch. Llama-3-8B at seqlen 2048, micro-batch 1: 16 GB bf16 weights + 23 GB accumulators
(26 of 32 blocks x 0.22 B params x 4 bytes) + ~13 GB activations of blocks 4..31 and logits
(~0.4 GB per block) = ~52 GB, so it fits one 80 GB GPU; per-block accumulators could go to the
host if memory were tighter. Gradients of a bf16 model are bf16 per micro-batch before the fp32 sum.
The model is left as found: weights, `requires_grad` flags, existing `.grad`s and train/eval mode.
The scores do not depend on n: with `disk_cache: true` they are stored and reused by runs with any n
(see `lp.pruners.base.ScoreCache`).
"""

from __future__ import annotations

import time

import torch

from lp.evaluate.ppl import token_nll
from lp.models import Decoder
from lp.progress import bar
from lp.pruners.base import PruneContext, ScoreCache, Selection, check_flag, check_n, per_layer

KEEP_FIRST, KEEP_LAST = 4, 2


def taylor_scores(model, windows: torch.Tensor, layers: list[int], micro_batch: int = 1,
                  progress: bool = False) -> dict[int, float]:
    """`{layer: sum |W * dL/dW|}` over the parameters of each dense layer in `layers`, with L the mean
    per-window next-token NLL of `windows` `[N, T]`, accumulated over micro-batches in float32."""
    dec = Decoder(model)
    params = {i: list(dec.layers[i].parameters()) for i in layers}
    grads = loss_grads(model, windows, [p for ps in params.values() for p in ps], micro_batch, progress)
    return {i: sum((grads[p] * p.detach().float()).abs().sum().item() for p in ps) for i, ps in params.items()}


def loss_grads(model, windows: torch.Tensor, params: list, micro_batch: int = 1, progress: bool = False,
               desc: str = "taylor gradients") -> dict:
    """`{param: dL/dparam}` (float32, the param's shape) for each of `params`, L the mean per-window
    next-token NLL of `windows` `[N, T]`: the sum of the micro-batch gradients, each added into a
    float32 accumulator as soon as backward produced it (see the module docstring for memory)."""
    device = next(model.parameters()).device
    acc = {p: torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params}
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
    label = "Taylor+"
    needs_calibration = True
    needs_weight_grads = True  # backward into the weights: not with offloaded layers (lp.devices)

    def __init__(self, n: int = 5, micro_batch: int = 1, disk_cache: bool = True):
        if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"pruner=taylor: pruner.micro_batch={micro_batch!r} must be an integer >= 1")
        self.n = n
        self.micro_batch = micro_batch
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
            scores = taylor_scores(ctx.model, windows, list(range(KEEP_FIRST, L - KEEP_LAST)), self.micro_batch,
                                   ctx.progress)
            passes, seconds = -(-len(windows) // self.micro_batch), time.perf_counter() - t0
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
