"""Perplexity on fixed windows (GPTQ protocol; see `lp.data.eval_windows`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lp.devices import input_device

CE_CHUNK = 32  # positions per float32 cross-entropy chunk: stays in cache, ~3x faster than one big upcast


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position -log softmax(logits)[target] in float32. logits `[T, V]` (any dtype), targets `[T]`."""
    return torch.cat([
        F.cross_entropy(logits[i:i + CE_CHUNK].float(), targets[i:i + CE_CHUNK], reduction="none")
        for i in range(0, len(targets), CE_CHUNK)
    ])


LOSS_DTYPES = ("float32", "logits", "bfloat16", "float16")


def check_loss_dtype(loss_dtype: str) -> None:
    if loss_dtype not in LOSS_DTYPES:
        raise ValueError(f"eval.ppl.loss_dtype={loss_dtype!r}; choose one of {list(LOSS_DTYPES)}")


def window_loss(logits: torch.Tensor, ids: torch.Tensor, loss_dtype: str = "float32") -> torch.Tensor:
    """Mean next-token cross-entropy of one window: logits `[T, V]`, ids `[T]` -> 0-dim float64.

    `float32` (accurate): per-position losses and their mean in float32. Any other choice is
    the official LinearPatch code's arithmetic: one `CrossEntropyLoss` (mean) over the T-1 shifted
    positions computed in the logits' own dtype (`logits`) or after casting them (`bfloat16`,
    `float16`), so the window's loss is rounded to that dtype (bf16 keeps 8 significant bits).
    """
    if loss_dtype == "float32":
        return token_nll(logits[:-1], ids[1:]).mean().double()
    lg = logits[:-1] if loss_dtype == "logits" else logits[:-1].to(getattr(torch, loss_dtype))
    return F.cross_entropy(lg, ids[1:]).float().double()


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl", progress: bool = True,
               loss_dtype: str = "float32"):
    """Mean next-token cross-entropy of each window: `[W]` float64 (see `window_loss`).

    Window w's value is the mean over its T-1 shifted positions of -log p(x_{t+1} | x_{<=t}).
    """
    check_loss_dtype(loss_dtype)
    device = input_device(model)
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        out += [window_loss(lg, ids, loss_dtype).cpu() for lg, ids in zip(logits, batch, strict=True)]
    return torch.stack(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl", progress: bool = True,
               loss_dtype: str = "float32") -> float:
    """PPL = exp(mean over windows of the per-window mean cross-entropy).

    `loss_dtype="float32"`: the mean and exp in float64. Otherwise as the official `test_ppl`:
    `exp(sum_w(float32(loss_w) * T) / (W * T))` in float32 (T = window length)."""
    nll = window_nll(model, windows, batch_size, desc, progress, loss_dtype)
    if loss_dtype == "float32":
        return math.exp(nll.mean().item())
    T = windows.shape[1]
    return torch.exp(torch.stack([x.float() * T for x in nll]).sum() / (len(nll) * T)).item()
