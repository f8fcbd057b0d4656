"""Perplexity on fixed windows (GPTQ protocol; see `lp.data.eval_windows`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl", progress: bool = True):
    """Mean next-token cross-entropy of each window: `[W]` float64.

    Window w's value is the mean over its T-1 shifted positions of -log p(x_{t+1} | x_{<=t}).
    """
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        out.append(nll.view(len(batch), -1).mean(1).double().cpu())
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl", progress: bool = True) -> float:
    """PPL = exp(mean over windows of the per-window mean cross-entropy)."""
    return math.exp(window_nll(model, windows, batch_size, desc, progress).mean().item())
