"""The one layer-replay engine: run a decoder's layers, final norm and LM head by hand.

Used by the removal-scoring pruners (`sleb`, `ppl`: NLL of the model without a layer), the
distillation student (`lp.distill`: only the layers from the first patch on, with gradients) and
held-out patch verification (NLL of the suffix after a cut, with a patch applied at the cut).

Conventions. Dense layers are numbered 0..L-1 as the model held them when the engine was built;
h_l = the residual stream entering dense layer l, `[N, T, D]` in the model dtype (h_0 = the
embedding output, scaling included); h_L = the last layer's output *before* the final norm. Token
windows are `[N, T]` int64; no `attention_mask` is passed to the model, so every layer's extra
arguments depend only on the batch shape `(B, T)`, never on token values.

  * `LayerCalls(model, modules)`: each module's positional/keyword arguments besides the hidden
    state (causal mask, rotary `(cos, sin)`, `position_ids`, ...), captured by forward pre-hooks
    during one ordinary forward per batch shape (per module, since e.g. Gemma2/3 give sliding and
    full-attention layers different masks and rotary tables); `call(i, h)` replays module i.
  * `Head(model)`: final norm + LM head + logit soft-capping (Gemma2/3 `final_logit_softcapping`),
    written once.
  * `Replay(model, windows, batch_size)`: fixed windows, processed in the same batches always, so a
    hidden state computed here is bitwise the one an ordinary forward of the same batches gives.
    `stream(l)` -> h_l; `nll(h, layers, patch)` -> per-window NLL `[N]` when `h` (optionally passed
    through `patch`) enters the dense `layers` in order, then the head.

Example: held-out NLL of the model without the block [i, i+n), bridged by `patch` (a module
`[B, T, D] -> [B, T, D]`, e.g. `lp.patch.LinearPatch`), against no patch:

    rp = Replay(dense_model, windows, batch_size=4)
    h = rp.stream(i)                                   # h_i, what enters the first removed layer
    after = list(range(i + n, rp.num_layers))          # the kept layers after the cut
    with_patch, without = rp.nll(h, after, patch), rp.nll(h, after)    # [N] float64 each
"""

from __future__ import annotations

import torch
from accelerate.utils import align_module_device
from torch import Tensor, nn

from lp.devices import input_device
from lp.evaluate.ppl import token_nll
from lp.models import Decoder, StopForward, check_finite, non_finite_error


def softcap(logits: Tensor, cap: float | None) -> Tensor:
    """Gemma2/3 final logit soft-capping `cap * tanh(logits / cap)`, as in their CausalLM forward
    (identity for `cap` None/0)."""
    return torch.tanh(logits / cap) * cap if cap else logits


class Head:
    """Final norm + LM head + logit soft-capping of `model`.

    `__call__(h)`: logits `[B, T, V]` from a last hidden state `h` `[B, T, D]` (h_L: norm, head,
    cap); `logits(hn)` the same from an already normed `hn`; `logits_at(hn, idx)`: logits
    `[B, T, k]` at vocabulary indices `idx` `[B, T, k]` only (exact: `W[idx] . hn` for a plain
    linear head, ~V/k times cheaper than the full head).
    """

    def __init__(self, model: nn.Module):
        dec = Decoder(model)
        self.norm = dec.norm
        self.lm_head = model.get_output_embeddings()
        key = dec.family.logit_softcap_key
        self.cap = getattr(model.config, key, None) if key else None

    def __call__(self, h: Tensor) -> Tensor:
        return self.logits(self.norm(h))

    def logits(self, hn: Tensor) -> Tensor:
        return softcap(self.lm_head(hn), self.cap)

    def logits_at(self, hn: Tensor, idx: Tensor) -> Tensor:
        if type(self.lm_head) is nn.Linear:
            with align_module_device(self.lm_head):  # onloads an offloaded head (accelerate), else a no-op
                w, bias = self.lm_head.weight, self.lm_head.bias
                idx, hn = idx.to(w.device), hn.to(w.device)
                out = torch.matmul(w[idx], hn.unsqueeze(-1)).squeeze(-1)  # [B,T,k,D] @ [B,T,D,1]
                if bias is not None:
                    out = out + bias[idx]
            return softcap(out, self.cap)
        return self.logits(hn).gather(-1, idx)


def _input_of(model: nn.Module, module: nn.Module, input_ids: Tensor) -> Tensor:
    """The hidden state `[B, T, D]` entering `module` during `model(input_ids)`; the forward stops
    there (`StopForward`), so later layers and the LM head never run."""
    got = []

    def stop(_mod, args, kwargs):
        got.append(args[0] if args else kwargs["hidden_states"])
        raise StopForward

    handle = module.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except StopForward:
        return got[0]
    finally:
        handle.remove()
    raise RuntimeError(f"the forward never reached {type(module).__name__}")


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class LayerCalls:
    """The arguments `model` passes each of `modules` (decoder layers and/or the final norm, in call
    order) besides the hidden state, captured per batch shape `(B, T)`.

    `capture(ids)`: for windows `ids` `[B, T]`, the hidden state entering `modules[0]` (no grad, no
    autocast); the first batch of each shape runs the model up to the last module's input once to
    record every module's arguments, later ones stop at `modules[0]`. `call(i, h)`: module i on
    `h` `[B, T, D]` with the arguments captured for that shape (its output hidden state).
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module]):
        if not modules:
            raise ValueError("LayerCalls needs at least one module")
        self.model = model
        self.modules = list(modules)
        self.shapes: dict[tuple, list[tuple[tuple, dict]]] = {}

    @torch.no_grad()
    def capture(self, ids: Tensor) -> Tensor:
        shape = tuple(ids.shape)
        device = input_device(self.model)
        ids = ids.to(device)
        with torch.autocast(device.type, enabled=False):
            if shape in self.shapes:
                return _input_of(self.model, self.modules[0], ids).detach()
            calls, first = [], []

            def grab(_mod, args, kwargs):
                if "hidden_states" in kwargs:
                    kwargs = dict(kwargs)
                    args = (kwargs.pop("hidden_states"), *args)
                if not calls:
                    first.append(args[0])
                calls.append((args[1:], kwargs))
                if len(calls) == len(self.modules):  # all seen: the rest of the model never runs
                    raise StopForward

            handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in self.modules]
            try:
                self.model(input_ids=ids, use_cache=False)
            except StopForward:
                pass
            else:
                raise RuntimeError(f"the model's forward called only {len(calls)} of the {len(self.modules)} "
                                   "modules to replay")
            finally:
                for hd in handles:
                    hd.remove()
        self.shapes[shape] = calls
        return first[0].detach()

    def call(self, i: int, h: Tensor) -> Tensor:
        calls = self.shapes.get(tuple(h.shape[:2]))
        if calls is None:
            raise RuntimeError(f"no captured arguments for batch shape {tuple(h.shape[:2])}; capture it first")
        args, kwargs = calls[i]
        out = self.modules[i](h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class Replay:
    """Decoder layers, final norm and LM head of `model` run by hand on fixed `windows` `[N, T]`.

    Windows are always processed in the same batches of `batch_size` (`batches`). Work is counted
    in units of the whole window set: `layer_calls` (one decoder layer over all N windows) and
    `head_calls` (final norm + LM head + cross-entropy over all N windows).
    """

    def __init__(self, model: nn.Module, windows: Tensor, batch_size: int = 1):
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [N, T] with T >= 2, got shape {tuple(windows.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.layers = list(Decoder(model).layers)  # dense numbering, whatever the caller removes later
        self.calls = LayerCalls(model, self.layers)
        self.head = Head(model)
        self.windows = windows.to(input_device(model))
        n = len(windows)
        self.batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        self.layer_calls = 0
        self.head_calls = 0

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _layer(self, index: int, h: Tensor, b: slice) -> Tensor:
        if tuple(h.shape[:2]) not in self.calls.shapes:
            self.calls.capture(self.windows[b])
        return self.calls.call(index, h)

    @torch.inference_mode()
    def embed(self) -> Tensor:
        """h_0 `[N, T, D]`: what enters layer 0 (the model's embedding path, scaling included)."""
        h = torch.cat([self.calls.capture(self.windows[b]) for b in self.batches])
        check_finite(h, 0, self.num_layers)
        return h

    @torch.inference_mode()
    def advance(self, h: Tensor, index: int, out: Tensor) -> Tensor:
        """`out` <- dense layer `index` applied to `h` (both `[N, T, D]`; `out` may be `h`)."""
        for b in self.batches:
            out[b] = self._layer(index, h[b], b)
        check_finite(out, index + 1, self.num_layers)
        self.layer_calls += 1
        return out

    @torch.inference_mode()
    def walk(self, upto: int, visit, chunk: int | None = None) -> None:
        """The layer-sequential pass every statistic is collected from (calibration, patch sums).

        For each chunk of `chunk` windows (a multiple of the batch size; default one batch): h_0 of the
        chunk, then dense layers 0..upto-1 one at a time, each over the chunk's batches; `visit(l, rows, h)`
        sees h_l `[len(rows), T, D]` (model dtype, on the device the last layer ran on; `rows` a slice
        of the windows) for l = 0..upto, in order. Layers from `upto` on, the final norm and the head never
        run. Under `model.onload=sequential` a layer's weights are onloaded once per batch call, so a
        larger chunk costs activation memory, not transfers. A stream with NaN/inf stops the pass with
        one line naming the layer that produced it (checked once per chunk: one host sync)."""
        if not 0 <= upto <= self.num_layers:
            raise ValueError(f"walk(upto={upto}): the model has layers 0..{self.num_layers - 1}")
        size = self.batches[0].stop - self.batches[0].start
        chunk = chunk or size
        if chunk % size:
            raise ValueError(f"walk: chunk={chunk} must be a multiple of the batch size {size}")
        for c in range(0, len(self.batches), chunk // size):
            batches = self.batches[c:c + chunk // size]
            rows = slice(batches[0].start, batches[-1].stop)
            local = [slice(b.start - rows.start, b.stop - rows.start) for b in batches]
            h = _cat([self.calls.capture(self.windows[b]) for b in batches])
            finite = torch.ones(upto + 1, dtype=torch.bool, device=h.device)
            finite[0] = torch.isfinite(h).all()
            visit(0, rows, h)
            for i in range(upto):
                h = _cat([self._layer(i, h[lb], b) for lb, b in zip(local, batches, strict=True)])
                finite[i + 1] = torch.isfinite(h).all().to(finite.device)
                visit(i + 1, rows, h)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0])
                raise non_finite_error(bad, self.num_layers, h.dtype)
            self.layer_calls += upto * (rows.stop - rows.start) / self.num_windows

    def stream(self, layer: int) -> Tensor:
        """h_layer `[N, T, D]` (0 <= layer <= L): the embedding output run through dense layers
        0..layer-1 (h_L: before the final norm)."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"stream({layer}): the model has layers 0..{self.num_layers - 1} (h_0..h_{self.num_layers})")
        h = self.embed()
        for i in range(layer):
            self.advance(h, i, h)
        return h

    @torch.inference_mode()
    def nll(self, h: Tensor, layers: list[int], patch: nn.Module | None = None) -> Tensor:
        """Per-window mean next-token NLL `[N]` (float64) when `h` `[N, T, D]` -- passed through
        `patch` first, if given -- enters the dense `layers` (in order), then the head."""
        out = []
        for b in self.batches:
            x = h[b] if patch is None else patch(h[b])
            for i in layers:
                x = self._layer(i, x, b)
            logits = self.head(x[:, :-1])
            targets = self.windows[b].to(logits.device)  # the head may run on another device than the embedding
            nll = [token_nll(lg, t[1:]).mean() for lg, t in zip(logits, targets, strict=True)]
            out.append(torch.stack(nll).double())
        self.layer_calls += len(layers)
        self.head_calls += 1
        return torch.cat(out)


class StreamCache:
    """H_p = the stream entering `kept[p]`, for positions p of the current `kept` list (dense indices
    in order), kept up to a memory budget: the one prefix cache of the engine (SLEB / PPL re-scoring,
    held-out verification).

    Positions 0..m-1 are stored as they are first computed, where m = max(1, budget // bytes of
    one position) (H_0 is always stored). A position beyond the budget is recomputed by walking
    forward from the highest known one (stored or buffered) into one of `buffers` reusable buffers
    (the least recently used; a buffer a walk starts from is kept, so with 2 buffers h_{a-1} and h_a
    stay side by side), so walking positions in increasing order costs one layer call per step either
    way; the tensor `get` returns stays valid until a later `get` reuses its buffer. `remove(p)` drops
    `kept[p]`: H_0..H_p stay valid (H_p now enters the next layer), every stored or buffered position
    after p is discarded and recomputed on demand. Memory: min(m, len(kept)) + `buffers` positions of
    N*T*D elements at most.
    """

    def __init__(self, runner: Replay, kept: list[int], budget_bytes: float, buffers: int = 1):
        self.runner = runner
        self.kept = list(kept)
        h0 = runner.embed()
        self.bytes_per_position = h0.numel() * h0.element_size()
        self.max_stored = max(1, int(budget_bytes // self.bytes_per_position))
        self.stored: dict[int, Tensor] = {0: h0}
        self.buffers = max(1, buffers)
        self._bufs: dict[int, Tensor] = {}  # position -> buffer, least recently used first
        self._spare: list[Tensor] = []  # buffers whose position was invalidated

    def get(self, p: int) -> Tensor:
        if not 0 <= p < len(self.kept):
            raise IndexError(f"position {p} out of range 0..{len(self.kept) - 1}")
        if p in self.stored:
            return self.stored[p]
        if p in self._bufs:
            self._bufs[p] = self._bufs.pop(p)  # most recently used
            return self._bufs[p]
        q = max(k for k in (*self.stored, *self._bufs) if k < p)
        h = self.stored[q] if q in self.stored else self._bufs[q]
        walking = None  # the buffer this walk writes into (in place after its first step)
        while q < p:
            if q + 1 < self.max_stored:
                out = self.stored[q + 1] = torch.empty_like(h)
            else:
                out = walking if walking is not None else self._buffer(keep=q, like=h)
                walking = out
            self.runner.advance(h, self.kept[q], out)
            q += 1
            if out is walking:  # record the buffer's new position, most recently used
                for k in [k for k, b in self._bufs.items() if b is out]:
                    del self._bufs[k]
                self._bufs[q] = out
            h = out
        return h

    def _buffer(self, keep: int, like: Tensor) -> Tensor:
        """A buffer to write into: a spare or new one while fewer than `buffers` exist, else the least
        recently used one that does not hold position `keep` (with a single buffer: that one, in place)."""
        if len(self._bufs) < self.buffers:
            return self._spare.pop() if self._spare else torch.empty_like(like)
        victims = [k for k in self._bufs if k != keep]
        return self._bufs.pop(victims[0] if victims else keep)

    def remove(self, p: int) -> None:
        """Drop the layer at position p from `kept`, invalidating the positions after it."""
        del self.kept[p]
        self.stored = {k: v for k, v in self.stored.items() if k <= p}
        for k in [k for k in self._bufs if k > p]:
            self._spare.append(self._bufs.pop(k))

    def info(self, budget_gb: float) -> dict:
        """Cache settings for result.json."""
        return {"enabled": True, "used": True, "budget_gb": budget_gb, "bytes_per_position": self.bytes_per_position,
                "max_positions_stored": min(self.max_stored, len(self.kept))}
