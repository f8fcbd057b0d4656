"""The student of output-KL distillation: the pruned + patched model from its first patch onwards.

The layers before the first patch are identical in teacher and student, so the hidden state
entering the first patched module is computed once per window under `no_grad` (`Suffix.prefix`,
kept in RAM by `PrefixStates` when it fits in `distill.prefix_cache_gb`) and the student runs --
forward and backward -- only from there: patched layer onwards, final norm, and the LM head
evaluated at the k teacher indices only (`W[idx] . h` instead of the full `[T, V]` logits; exact,
since the loss depends on nothing else). The modules are replayed by `lp.replay.LayerCalls` with
the arguments the model itself passed them, so per-layer masks and rotary embeddings (e.g.
Gemma3's sliding/full attention) are reproduced exactly. Hidden states are `[B, T, D]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lp import models
from lp.devices import model_dtype
from lp.patch import Patched, find_patches
from lp.replay import Head, LayerCalls, Replay


def topk_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on the teacher's top-k support.

    `student`, `teacher`: logits `[..., k]` at the same vocabulary indices; each is renormalised
    with a (log-)softmax over its k entries (in float32)."""
    lt = F.log_softmax(teacher.to(student.device).float(), dim=-1)
    ls = F.log_softmax(student.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


class Suffix:
    """The student from its first patched module onwards, replayed with `lp.replay.LayerCalls`.

    `modules`: decoder layers from the first one holding a patch (`Patched`, or an mlp-site patch
    on its MLP output, `lp.patch.OutputPatched`), then the final norm (only the norm when the first
    patch wraps it). `patches`: every `LinearPatch` of the model, the trainable matrices (for an
    mlp-site kind: the correction T after down_proj, folded into it when saved).
    `prefix(ids)` -> hidden state entering `modules[0]` `[B,T,D]` (no grad, no autocast); `hidden(h)` -> final-normed hidden `[B,T,D]`; `logits_at(hn, idx)` -> logits
    `[B,T,k]` at vocabulary indices `idx`; `logits(hn)` -> full logits `[B,T,V]` (`lp.replay.Head`).
    """

    def __init__(self, model: nn.Module):
        dec = models.Decoder(model)
        layers, norm = list(dec.layers), dec.norm
        starts = [i for i, m in enumerate(layers) if find_patches(m)]  # Patched, or an mlp-site patch inside
        if starts:
            self.modules, self.start = [*layers[starts[0]:], norm], f"model.layers.{starts[0]}"
        elif isinstance(norm, Patched):
            self.modules, self.start = [norm], "model.norm"
        else:
            raise ValueError("distill: the model has no patched module to train (patch=none?)")
        self.patches = find_patches(model)
        self.calls = LayerCalls(model, self.modules)
        self._head = Head(model)
        self.head = self._head.lm_head

    def prefix(self, ids: torch.Tensor) -> torch.Tensor:
        return self.calls.capture(ids)

    def has_shape(self, shape) -> bool:
        """Whether the arguments for batch shape `(B, T)` were captured (by `prefix`)."""
        return tuple(shape) in self.calls.shapes

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        for i in range(len(self.modules)):
            h = self.calls.call(i, h)
        return h

    def logits_at(self, hn: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._head.logits_at(hn, idx)

    def logits(self, hn: torch.Tensor) -> torch.Tensor:
        return self._head.logits(hn)


def full_student_loss(model: nn.Module, ids: torch.Tensor, idx: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reference: the whole pruned model as student (`ids [B,T]`, teacher `idx`/logits `[B,T,k]`)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return topk_kl(logits.gather(-1, idx.to(logits.device)), teacher.to(logits.device))


class PrefixStates:
    """Hidden states entering the student's first patched module for every teacher window `[N, T, D]`:
    the engine's stream at that layer (`lp.replay.Replay.stream`), computed once and kept when it fits
    in `budget_bytes` (else each batch's states are captured again, `Suffix.prefix`)."""

    def __init__(self, suffix: Suffix, teacher, batch_size: int, budget_bytes: float):
        self.suffix = suffix
        model = suffix.calls.model
        size = len(teacher) * teacher.seqlen * suffix.head.weight.shape[1] * model_dtype(model).itemsize
        self.states = None
        if size <= budget_bytes:
            layers = list(models.Decoder(model).layers)
            first = layers.index(suffix.modules[0]) if suffix.modules[0] in layers else len(layers)
            ids = torch.from_numpy(teacher.ids[:].astype("int64"))
            self.states = Replay(model, ids, batch_size).stream(first).clone()  # clone: a normal tensor, not an
            # inference-mode one, since the student's backward saves it

    @property
    def cached(self) -> bool:
        return self.states is not None

    def get(self, rows, ids: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` for teacher rows `rows` (whose token ids are `ids` `[B, T]`)."""
        if self.states is None:
            return self.suffix.prefix(ids)
        h = self.states[torch.as_tensor(list(rows), device=self.states.device)]
        if not self.suffix.has_shape(h.shape[:2]):  # a batch shape not seen when caching
            self.suffix.prefix(ids)
        return h
