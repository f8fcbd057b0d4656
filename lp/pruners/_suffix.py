"""Calibration NLL of a model with layers removed, computed from cached hidden states.

Shared by the removal-scoring pruners (`sleb`, `ppl`). Conventions (see `lp.models`):
dense layers 0..L-1; `kept` is the ordered list of dense indices still in the model and a
*position* p indexes `kept`; H_p = residual stream entering `kept[p]` for every calibration
window, a `[N, T, D]` tensor in the model dtype (H_0 = the embedding output).

Removing the layer at position p leaves H_0..H_p unchanged (a layer's removal cannot change what
enters it), so the model without `kept[p]` has NLL `suffix_nll(H_p, kept[p+1:])`: only the layers
after p, the final norm and the LM head run. `PrefixCache` keeps H_p for as many leading
positions as a memory budget allows and walks forward from the last stored one otherwise.

Layers are called by hand, so their keyword arguments (causal mask, rotary `(cos, sin)`,
`position_ids`, ...) are captured per layer with forward pre-hooks during one ordinary forward
of a batch of each size used (per layer: Gemma2/3 give sliding and full-attention layers
different masks and rotary tables). No `attention_mask` is passed to the model, so these
arguments depend only on the batch shape, never on token values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lp.evaluate.ppl import token_nll
from lp.models import Decoder, input_of
from lp.pruners.base import check_cache_gb, check_flag


class LayerRunner:
    """Runs decoder layers, the final norm and the LM head of `model` by hand on calibration windows.

    `windows`: `[N, T]` token ids. Layers always process the windows in the same batches of
    `batch_size`, so a hidden state computed here is bitwise the one an ordinary forward of
    the same batches gives. Work is counted in units of the whole calibration set:
    `layer_calls` (one decoder layer over all N windows) and `head_calls` (final norm + LM head +
    cross-entropy over all N windows).
    """

    def __init__(self, model, windows: Tensor, batch_size: int = 1):
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"calibration windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.dec = Decoder(model)
        self.layers = list(self.dec.layers)  # dense numbering, whatever the caller removes later
        self.device = next(model.parameters()).device
        self.windows = windows.to(self.device)
        n = len(windows)
        self.batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._kwargs: dict[int, list[tuple[tuple, dict]]] = {}  # batch size -> per-layer (args, kwargs)
        self.layer_calls = 0
        self.head_calls = 0

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    # ----------------------------------------------------------------- capture
    def _layer_kwargs(self, bs: int) -> list[tuple[tuple, dict]]:
        """Per-layer extra (args, kwargs) of a batch of `bs` windows, captured from one forward."""
        if bs not in self._kwargs:
            got = [None] * len(self.layers)

            def hook(i):
                def pre(_mod, args, kwargs):
                    got[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
                return pre

            handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
                       for i, layer in enumerate(self.layers)]
            try:
                self.model(input_ids=self.windows[:bs], use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            if any(g is None for g in got):
                raise RuntimeError("not every decoder layer ran during the capture forward")
            self._kwargs[bs] = got
        return self._kwargs[bs]

    @torch.inference_mode()
    def embed(self) -> Tensor:
        """H_0 `[N, T, D]`: what enters layer 0 (the model's embedding path, scaling included)."""
        return torch.cat([input_of(self.model, self.layers[0], self.windows[b]) for b in self.batches])

    # ----------------------------------------------------------------- compute
    def _layer(self, index: int, h: Tensor) -> Tensor:
        args, kwargs = self._layer_kwargs(len(h))[index]
        out = self.layers[index](h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def advance(self, h: Tensor, index: int, out: Tensor) -> Tensor:
        """`out` <- dense layer `index` applied to `h` (both `[N, T, D]`; `out` may be `h`)."""
        for b in self.batches:
            out[b] = self._layer(index, h[b])
        self.layer_calls += 1
        return out

    def _window_nll(self, h: Tensor, ids: Tensor) -> Tensor:
        """Per-window mean next-token NLL `[B]` (float64) from the last hidden state `h` `[B, T, D]`."""
        logits = self.model.lm_head(self.dec.norm(h[:, :-1]))
        if self.softcap:  # Gemma2/3 final logit soft-capping, as in their CausalLM forward
            logits = torch.tanh(logits / self.softcap) * self.softcap
        nll = [token_nll(lg, t[1:]).mean() for lg, t in zip(logits, ids, strict=True)]
        return torch.stack(nll).double()

    @torch.inference_mode()
    def suffix_window_nll(self, h: Tensor, layers: list[int]) -> Tensor:
        """Per-window mean NLL `[N]` (float64) when `h` `[N, T, D]` enters dense layers `layers`
        (in order), then the final norm and the LM head."""
        out = []
        for b in self.batches:
            x = h[b]
            for i in layers:
                x = self._layer(i, x)
            out.append(self._window_nll(x, self.windows[b]))
        self.layer_calls += len(layers)
        self.head_calls += 1
        return torch.cat(out)

    def suffix_nll(self, h: Tensor, layers: list[int]) -> float:
        """Mean over windows of `suffix_window_nll(h, layers)`: the calibration NLL."""
        return self.suffix_window_nll(h, layers).mean().item()


class PrefixCache:
    """H_p for positions p of the current `kept` list, kept up to a memory budget.

    Positions 0..m-1 are stored as they are first computed, where m = max(1, budget // bytes of
    one position) (H_0 is always stored). A position beyond the budget is recomputed by walking
    forward from the highest stored one into a single reusable buffer, so walking positions in
    increasing order costs one layer call per step either way; the tensor `get` returns stays
    valid until the next `get`. `remove(p)` drops `kept[p]`: H_0..H_p stay valid (H_p now enters
    the next layer), every stored position after p is discarded and recomputed on demand.
    Memory: min(m, len(kept)) + 1 positions of N*T*D elements at most.
    """

    def __init__(self, runner: LayerRunner, kept: list[int], budget_bytes: float):
        self.runner = runner
        self.kept = list(kept)
        h0 = runner.embed()
        self.bytes_per_position = h0.numel() * h0.element_size()
        self.max_stored = max(1, int(budget_bytes // self.bytes_per_position))
        self.stored: dict[int, Tensor] = {0: h0}
        self._buf: Tensor | None = None
        self._buf_pos: int | None = None

    def get(self, p: int) -> Tensor:
        if not 0 <= p < len(self.kept):
            raise IndexError(f"position {p} out of range 0..{len(self.kept) - 1}")
        if p in self.stored:
            return self.stored[p]
        if self._buf_pos == p:
            return self._buf
        q = max(k for k in self.stored if k < p)
        h = self.stored[q]
        if self._buf_pos is not None and q < self._buf_pos < p:
            q, h = self._buf_pos, self._buf
        while q < p:
            if q + 1 < self.max_stored:
                out = self.stored[q + 1] = torch.empty_like(h)
            else:
                if self._buf is None:
                    self._buf = torch.empty_like(h)
                out = self._buf
            self.runner.advance(h, self.kept[q], out)
            h, q = out, q + 1
        self._buf_pos = p if h is self._buf else self._buf_pos
        return h

    def remove(self, p: int) -> None:
        """Drop the layer at position p from `kept`, invalidating the positions after it."""
        del self.kept[p]
        self.stored = {k: v for k, v in self.stored.items() if k <= p}
        if self._buf_pos is not None and self._buf_pos > p:
            self._buf_pos = None

    def info(self, budget_gb: float) -> dict:
        """Cache settings for result.json."""
        return {"enabled": True, "used": True, "budget_gb": budget_gb, "bytes_per_position": self.bytes_per_position,
                "max_positions_stored": min(self.max_stored, len(self.kept))}


def score_removals(runner: LayerRunner, kept: list[int], candidates, prefix: PrefixCache | None,
                   h0: Tensor | None = None) -> dict[int, float]:
    """Calibration NLL of the model made of `kept` minus each single candidate: `{layer: nll}`.

    With `prefix` (whose `kept` must equal `kept`) each candidate at position p costs its
    suffix only, walking positions in increasing order. Without it (`cache: false`, the naive
    re-scoring) each candidate re-runs every remaining layer from the embedding output `h0`.
    """
    cands = set(candidates)
    if not cands <= set(kept):
        raise ValueError(f"candidates {sorted(cands - set(kept))} are not among the kept layers")
    scores = {}
    if prefix is None:
        if h0 is None:
            raise ValueError("score_removals without a prefix cache needs h0 (the embedding output)")
        for layer in kept:
            if layer in cands:
                scores[layer] = runner.suffix_nll(h0, [k for k in kept if k != layer])
        return scores
    if prefix.kept != list(kept):
        raise ValueError("prefix cache is out of sync with the kept layers")
    for p, layer in enumerate(kept):
        if layer in cands:
            scores[layer] = runner.suffix_nll(prefix.get(p), kept[p + 1:])
    return scores


# --------------------------------------------------------------------------- pruner base
class SuffixPruner:
    """Settings and bookkeeping shared by `sleb` and `ppl`, which score removals with `score_removals`."""

    name = ""
    label = ""
    needs_calibration = True

    def __init__(self, n: int = 5, cache: bool = True, cache_gb: float = 4.0, disk_cache: bool = True):
        self.n = n
        self.cache = check_flag(self.name, "cache", cache)
        self.cache_gb = check_cache_gb(self.name, cache_gb)
        self.disk_cache = check_flag(self.name, "disk_cache", disk_cache)

    def start(self, runner: LayerRunner, kept: list[int]) -> tuple[PrefixCache | None, Tensor | None]:
        """`(prefix, h0)` for `score_removals`: a prefix cache, or (`cache: false`) the embedding output."""
        if self.cache:
            return PrefixCache(runner, kept, self.cache_gb * 2**30), None
        return None, runner.embed()

    def cost(self, runner: LayerRunner | None, prefix: PrefixCache | None, seconds: float) -> dict:
        """Calls, cache settings and time for result.json (`runner` None: everything came from disk)."""
        if runner is None:
            cache = {"enabled": self.cache, "used": False}
        else:
            cache = prefix.info(self.cache_gb) if prefix else {"enabled": False}
        return {"layer_calls": runner.layer_calls if runner else 0, "head_calls": runner.head_calls if runner else 0,
                "cache": cache, "time_s": round(seconds, 3)}
