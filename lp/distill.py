"""Output-KL distillation of LinearPatch matrices (`distill=output_kl`).

After training-free patching, only the patch matrices are fine-tuned so that the pruned model's
next-token distribution matches the dense model's:

  * teacher: the *dense* model (before `drop_layers`). Its top-k logits per token (k = 50) are
    computed once and cached on disk (`TeacherCache`), keyed by model, data, sampler settings and k;
  * student: the pruned + patched model. Its logits are taken at the teacher's k indices;
  * loss: KL(teacher || student) over that support, both renormalised with a softmax over the k
    entries, averaged per token (`topk_kl`).

Shapes: windows `[N, T]` token ids; teacher indices `[N, T, k]` (int32 on disk, int64 in memory)
and teacher logits `[N, T, k]` (stored in the model's logit dtype, so bf16 logits of a bf16 teacher
round-trip bit-exactly); hidden states `[B, T, D]`.

Suffix-only student (`Suffix`): the layers before the first patch are identical in teacher and
student, so the hidden state entering the first patched module is computed once per window under
`no_grad` (and kept in RAM when it fits in `prefix_cache_gb`) and the student is run -- forward and
backward -- only from there: patched layer onwards, final norm, and the LM head evaluated at the k
teacher indices only (`W[idx] . h` instead of the full `[T, V]` logits; exact, since the loss
depends on nothing else). Each suffix module is called with the positional/keyword arguments the
model itself passed it (captured by forward pre-hooks once per batch shape), so per-layer masks and
rotary embeddings (e.g. Gemma3's sliding/full attention) are reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lp import data, models
from lp.evaluate.ppl import token_nll
from lp.patch import Patched
from lp.replay import Head, LayerCalls

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METHODS = ("output_kl",)
KEEP = ("last", "best")
AUTOCAST = ("auto", "bfloat16", "float16", "none")
DISK_MARGIN = 64 << 20  # bytes kept free beyond the cache estimate
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # 16-bit floats are stored as raw bits
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----------------------------------------------------------------------------- config
def check_config(d, max_positions: int | None = None) -> None:
    """Validate a `conf/distill` section (no weights needed). Raises ValueError naming the bad value."""
    if d.name not in METHODS:
        raise ValueError(f"distill.name={d.name!r}; choose one of {['none', *METHODS]}")
    for key in ("nsamples", "seqlen", "k", "epochs", "batch_size"):
        if int(d[key]) < 1:
            raise ValueError(f"distill.{key}={d[key]} must be >= 1")
    if int(d.seqlen) < 2:
        raise ValueError(f"distill.seqlen={d.seqlen} must be > 1")
    if max_positions and int(d.seqlen) > max_positions:
        raise ValueError(f"distill.seqlen={d.seqlen} exceeds the model's context ({max_positions} positions)")
    if int(d.nval) < 0 or int(d.val_every) < 0 or (d.patience is not None and int(d.patience) < 1):
        raise ValueError(f"distill.nval={d.nval}, val_every={d.val_every} must be >= 0 and "
                         f"distill.patience={d.patience} null or >= 1")
    if d.keep not in KEEP:
        raise ValueError(f"distill.keep={d.keep!r}; choose one of {list(KEEP)}")
    if int(d.nval) == 0 and (d.keep == "best" or d.patience is not None):
        raise ValueError(f"distill.keep={d.keep!r} / distill.patience={d.patience} need validation windows "
                         "(distill.nval >= 1)")
    if d.autocast not in AUTOCAST:
        raise ValueError(f"distill.autocast={d.autocast!r}; choose one of {list(AUTOCAST)}")
    if d.schedule not in ("cosine", "constant"):
        raise ValueError(f"distill.schedule={d.schedule!r}; choose one of ['cosine', 'constant']")
    if not 0 <= float(d.min_lr_ratio) <= 1:
        raise ValueError(f"distill.min_lr_ratio={d.min_lr_ratio} must be in [0, 1]")
    if float(d.lr) <= 0 or float(d.weight_decay) < 0 or (d.grad_clip is not None and float(d.grad_clip) <= 0):
        raise ValueError(f"distill.lr={d.lr} must be > 0, weight_decay={d.weight_decay} >= 0, "
                         f"grad_clip={d.grad_clip} null or > 0")
    if float(d.prefix_cache_gb) < 0:
        raise ValueError(f"distill.prefix_cache_gb={d.prefix_cache_gb} must be >= 0")


def resolve_autocast(name: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bfloat16 on CPU and on CUDA devices that support it, else no autocast."""
    if name == "none":
        return None
    if name == "auto":
        ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.bfloat16 if ok else None
    return _DTYPE_NAMES[name]


# ----------------------------------------------------------------------------- teacher cache
def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:20]


def cache_bytes(n: int, seqlen: int, k: int, value_bytes: int) -> int:
    """Size of a teacher cache: ids int32 [N,T] + indices int32 [N,T,k] + values [N,T,k]."""
    return n * seqlen * (4 + k * (4 + value_bytes))


class TeacherCache:
    """A complete on-disk teacher cache (read-only numpy memmaps, no pickle).

    Directory layout: `ids.npy` int32 `[N, T]`, `topk_idx.npy` int32 `[N, T, k]`, `topk_val.npy`
    `[N, T, k]` (float32, or the raw int16 bits of bf16/fp16 logits), `meta.json` (key, shapes,
    dtype). Rows `0..ntrain-1` are training windows, `ntrain..N-1` validation windows.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self.idx = np.load(self.path / "topk_idx.npy", mmap_mode="r")
        self.val = np.load(self.path / "topk_val.npy", mmap_mode="r")
        self.dtype = _DTYPE_NAMES[self.meta["values_dtype"]]
        self.ntrain, self.nval, self.k = self.meta["ntrain"], self.meta["nval"], self.meta["k"]

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.ids.shape[1]

    def get(self, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows `rows` (any order): `(ids [B,T] int64, topk_idx [B,T,k] int64, topk_logits [B,T,k])`."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        vals = torch.from_numpy(np.ascontiguousarray(self.val[r]))
        if self.dtype in _BITS:
            vals = vals.view(self.dtype)
        return (torch.from_numpy(self.ids[r].astype(np.int64)), torch.from_numpy(self.idx[r].astype(np.int64)),
                vals)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@torch.no_grad()
def build_teacher(model: nn.Module, windows: torch.Tensor, ntrain: int, k: int, key: dict,
                  root: Path | None = None, batch_size: int = 1, progress: bool = True) -> TeacherCache:
    """Top-k logits of `model` (the dense teacher) on `windows [N, T]`, cached under
    `root / key_hash(key)` (default `cache_dir()/teacher`). Reuses a complete cache with the same
    key; otherwise estimates its size, checks free disk (OSError before writing anything) and
    writes it into a temporary folder renamed into place when complete (a crash never leaves a
    cache that a later run would read)."""
    root = Path(root) if root is not None else models.cache_dir() / "teacher"
    h = key_hash(key)
    path = root / h
    if (path / "meta.json").is_file():
        log.info("teacher cache: reusing %s", path)
        return _open(path, key)
    n, seqlen = windows.shape
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"distill.k={k} must be in [1, {vocab}] (the model's vocabulary size)")
    est = cache_bytes(n, seqlen, k, head.weight.element_size())
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    log.info("teacher cache: writing %d windows x %d tokens, k=%d: ~%.1f MB to %s (%.1f GB free)",
             n, seqlen, k, est / 2**20, path, free / 2**30)
    if free < est + DISK_MARGIN:
        raise OSError(f"not enough disk for the teacher cache: needs ~{est / 2**30:.2f} GB "
                      f"(+{DISK_MARGIN >> 20} MB margin) in {root}, {free / 2**30:.2f} GB free; "
                      "free space, set LP_CACHE_DIR elsewhere, or lower distill.nsamples/seqlen/k")
    for stale in root.glob(f".{h}.tmp-*"):  # leftovers of crashed writers
        if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{h}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        device = next(model.parameters()).device
        ids = np.lib.format.open_memmap(tmp / "ids.npy", "w+", np.int32, (n, seqlen))
        ids[:] = windows.numpy()
        idx_mm = np.lib.format.open_memmap(tmp / "topk_idx.npy", "w+", np.int32, (n, seqlen, k))
        val_mm, vdtype = None, None
        for i in tqdm(range(0, n, batch_size), desc="teacher top-k", disable=not progress, unit="batch"):
            logits = model(input_ids=windows[i:i + batch_size].to(device), use_cache=False).logits
            top = logits.topk(k, dim=-1)
            if val_mm is None:
                vdtype = top.values.dtype
                np_dtype = np.int16 if vdtype in _BITS else np.float32
                val_mm = np.lib.format.open_memmap(tmp / "topk_val.npy", "w+", np_dtype, (n, seqlen, k))
            vals = top.values.cpu()
            vals = vals.view(_BITS[vdtype]) if vdtype in _BITS else vals.float()
            val_mm[i:i + batch_size] = vals.numpy()
            idx_mm[i:i + batch_size] = top.indices.cpu().to(torch.int32).numpy()
        for mm in (ids, idx_mm, val_mm):
            mm.flush()
        del ids, idx_mm, val_mm
        meta = {"format": FORMAT_VERSION, "key": key, "hash": h, "ntrain": int(ntrain), "nval": int(n - ntrain),
                "seqlen": int(seqlen), "k": int(k), "values_dtype": str(vdtype).removeprefix("torch."),
                "bytes": sum(f.stat().st_size for f in tmp.iterdir()), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        try:
            os.rename(tmp, path)
        except OSError:  # another process completed the same cache first
            if not (path / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(path, key)


def _open(path: Path, key: dict) -> TeacherCache:
    cache = TeacherCache(path)
    if cache.meta["key"] != json.loads(json.dumps(key, default=str)):  # same hash, other identity: never reuse
        raise RuntimeError(f"teacher cache {path} holds a different key than requested; delete it")
    return cache


def distill_windows(cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training windows `[nsamples, seqlen]` from the first (1 - holdout) of `cfg.calib`'s corpus and
    `nval` validation windows from its held-out tail, with provenance."""
    d, c = cfg.distill, cfg.calib
    ids, prov = data.tokenized(tokenizer, c.corpus, c.split, cfg.data.root, cfg.data.source)
    train, val = data.calibration_windows(ids, int(d.nsamples), int(d.seqlen), int(d.seed), holdout=c.holdout,
                                          nval=int(d.nval))
    return train, val, {**prov, "nsamples": int(d.nsamples), "nval": int(d.nval), "seqlen": int(d.seqlen),
                        "seed": int(d.seed), "holdout": c.holdout}


def teacher_key(cfg, prov: dict, windows: torch.Tensor) -> dict:
    """Identity of a teacher cache: model, data, sampler settings, k and the windows' content."""
    from omegaconf import OmegaConf

    d = cfg.distill
    return {"format": FORMAT_VERSION, "model": OmegaConf.to_container(cfg.model, resolve=True),
            "data": {k: prov.get(k) for k in ("corpus", "split", "source", "tokens", "nsamples", "nval", "seqlen",
                                              "seed", "holdout")},
            "k": int(d.k), "windows_sha256": windows_digest(windows)}


def prepare_teacher(cfg, model: nn.Module, tokenizer) -> tuple[TeacherCache, dict]:
    """Build (or verify present) the teacher cache for `cfg.distill` from the *dense* `model`.
    Call before `drop_layers`. Returns `(cache, provenance)`: where its windows came from and the
    cache folder (for `result["data"]["distill"]`)."""
    train, val, prov = distill_windows(cfg, tokenizer)
    windows = torch.cat([train, val])
    key = teacher_key(cfg, prov, windows)
    cache = build_teacher(model, windows, len(train), int(cfg.distill.k), key, batch_size=int(cfg.distill.batch_size),
                          progress=bool(cfg.distill.get("progress", True)))
    return cache, {**prov, "teacher_cache": str(cache.path), "teacher_cache_mb": round(cache.meta["bytes"] / 2**20, 2)}


# ----------------------------------------------------------------------------- loss + suffix student
def topk_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on the teacher's top-k support.

    `student`, `teacher`: logits `[..., k]` at the same vocabulary indices; each is renormalised
    with a (log-)softmax over its k entries (in float32)."""
    lt = F.log_softmax(teacher.float(), dim=-1)
    ls = F.log_softmax(student.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()




class Suffix:
    """The student from its first patched module onwards, replayed with `lp.replay.LayerCalls`.

    `modules`: decoder layers from the first `Patched` one, then the final norm (only the norm when
    the first patch wraps it). `prefix(ids)` -> hidden state entering `modules[0]` `[B,T,D]` (no
    grad, no autocast); `hidden(h)` -> final-normed hidden `[B,T,D]`; `logits_at(hn, idx)` -> logits
    `[B,T,k]` at vocabulary indices `idx`; `logits(hn)` -> full logits `[B,T,V]` (`lp.replay.Head`).
    """

    def __init__(self, model: nn.Module):
        dec = models.Decoder(model)
        layers, norm = list(dec.layers), dec.norm
        starts = [i for i, m in enumerate(layers) if isinstance(m, Patched)]
        if starts:
            self.modules, self.start = [*layers[starts[0]:], norm], f"model.layers.{starts[0]}"
        elif isinstance(norm, Patched):
            self.modules, self.start = [norm], "model.norm"
        else:
            raise ValueError("distill: the model has no patched module to train (patch=none?)")
        self.patches = [m.patch for m in [*layers, norm] if isinstance(m, Patched)]
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


# ----------------------------------------------------------------------------- training
@dataclass
class _Freeze:
    flags: dict

    @classmethod
    def only(cls, model: nn.Module, trainable: list[nn.Parameter]) -> _Freeze:
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        return cls(flags)

    def restore(self):
        for p, flag in self.flags.items():
            p.requires_grad_(flag)


def _lr_lambda(d, total: int):
    r = float(d.min_lr_ratio)
    if d.schedule == "constant":
        return lambda s: 1.0
    return lambda s: r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def _rss_peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


class PeakRss:
    """Peak resident set size (MB) of this process while the context is active, sampled every
    `interval` s from /proc/self/statm (Linux; elsewhere `peak_mb` is the process-lifetime ru_maxrss)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb, self._stop = interval, 0.0, threading.Event()
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0

    def _sample(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page_mb

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self):
        self.linux = os.path.exists("/proc/self/statm")
        if self.linux:
            self.peak_mb = self._sample()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_):
        if self.linux:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, self._sample())
        else:
            self.peak_mb = _rss_peak_mb()


def distill(model: nn.Module, teacher: TeacherCache, d, tracker=None, progress: bool | None = None) -> dict:
    """Fine-tune only the patch matrices of the patched, pruned `model` on `teacher` (settings `d` =
    `cfg.distill`), in place. `tracker` (optional, `lp.tracking.Tracker`) gets the loss curves.
    Returns the `result["distill"]` summary; see `metrics()` for the scalars."""
    t_start = time.perf_counter()
    progress = bool(d.get("progress", True)) if progress is None else progress
    suffix = Suffix(model)
    params = [p for m in suffix.patches for p in m.parameters()]
    bad = [tuple(p.shape) for p in params if p.dtype != torch.float32]
    if bad:
        raise TypeError(f"patch parameters must be float32 master weights, got {bad}")
    if teacher.k != int(d.k) or teacher.seqlen != int(d.seqlen):
        raise ValueError(f"teacher cache {teacher.path} has k={teacher.k}, seqlen={teacher.seqlen}; "
                         f"distill asks k={d.k}, seqlen={d.seqlen}")
    device = next(model.parameters()).device
    amp = resolve_autocast(d.autocast, device)
    bs, ntrain, nval = int(d.batch_size), teacher.ntrain, teacher.nval
    steps_per_epoch = math.ceil(ntrain / bs)
    total = int(d.epochs) * steps_per_epoch
    init = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    freeze = _Freeze.only(model, params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = PeakRss().__enter__()
    rss_start = rss.peak_mb
    torch.manual_seed(int(d.seed))
    try:
        # hidden states entering the first patch: computed once, kept in RAM when they fit
        t0 = time.perf_counter()
        state_bytes = len(teacher) * teacher.seqlen * suffix.head.weight.shape[1] * \
            next(model.parameters()).element_size()
        states = None
        if state_bytes <= float(d.prefix_cache_gb) * 2**30:
            states = [None] * len(teacher)
            for i in tqdm(range(0, len(teacher), bs), desc="distill prefix", disable=not progress, unit="batch"):
                rows = list(range(i, min(i + bs, len(teacher))))
                h = suffix.prefix(teacher.get(rows)[0])
                for r, hr in zip(rows, h, strict=True):
                    states[r] = hr
        t_prefix = time.perf_counter() - t0

        def batch_states(rows, ids):
            if states is None:
                return suffix.prefix(ids)
            h = torch.stack([states[r] for r in rows])
            if not suffix.has_shape(h.shape[:2]):  # a batch shape not seen when caching
                suffix.prefix(ids)
            return h

        def amp_ctx():
            return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

        @torch.no_grad()
        def evaluate() -> dict:
            kls, nlls = [], []
            for i in range(ntrain, ntrain + nval, bs):
                rows = list(range(i, min(i + bs, ntrain + nval)))
                ids, idx, tl = teacher.get(rows)
                with amp_ctx():
                    hn = suffix.hidden(batch_states(rows, ids))
                    kls.append(topk_kl(suffix.logits_at(hn, idx.to(device)), tl.to(device)).item() * len(rows))
                    logits = suffix.logits(hn)
                nlls += [token_nll(lg[:-1], w[1:].to(device)).mean().item() for lg, w in zip(logits, ids, strict=True)]
            return {"loss": sum(kls) / nval, "ppl": math.exp(sum(nlls) / nval)}

        opt = torch.optim.AdamW(params, lr=float(d.lr), weight_decay=float(d.weight_decay))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(d, total))
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16 and device.type == "cuda")
        gen = torch.Generator().manual_seed(int(d.seed))
        val_every = int(d.val_every)
        t_val = 0.0

        def validate(step):
            nonlocal t_val
            t = time.perf_counter()
            v = {"step": step, **evaluate()}
            t_val += time.perf_counter() - t
            if tracker is not None:
                tracker.log({"distill/val_loss": v["loss"], "distill/val_ppl": v["ppl"]}, step=step)
            return v

        val_points = [validate(0)] if nval else []
        best = (val_points[0]["loss"], 0, [p.detach().clone() for p in params]) if nval else None
        bad_evals, stopped_early = 0, False
        losses, grad_norms = [], []
        step, ema = 0, None
        t_train0, t_val0 = time.perf_counter(), t_val
        bar = tqdm(total=total, desc="distill", disable=not progress, unit="step")
        for _epoch in range(int(d.epochs)):
            perm = torch.randperm(ntrain, generator=gen).tolist()
            for b in range(0, ntrain, bs):
                rows = perm[b:b + bs]
                ids, idx, tl = teacher.get(rows)
                h = batch_states(rows, ids)
                with amp_ctx():
                    loss = topk_kl(suffix.logits_at(suffix.hidden(h), idx.to(device)), tl.to(device))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                gn = torch.nn.utils.clip_grad_norm_(params, float(d.grad_clip) if d.grad_clip else float("inf"))
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                lv = loss.item()
                losses.append(lv)
                grad_norms.append(float(gn))
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}")
                if tracker is not None:
                    tracker.log({"distill/loss": lv, "distill/lr": sched.get_last_lr()[0],
                                 "distill/grad_norm": float(gn)}, step=step)
                if nval and ((val_every and step % val_every == 0) or step == total):
                    v = validate(step)
                    val_points.append(v)
                    if v["loss"] < best[0]:
                        best, bad_evals = (v["loss"], step, [p.detach().clone() for p in params]), 0
                    else:
                        bad_evals += 1
                    if d.patience is not None and bad_evals >= int(d.patience):
                        stopped_early = True
                        break
            if stopped_early:
                break
        bar.close()
        t_train = time.perf_counter() - t_train0 - (t_val - t_val0)  # optimisation steps only
        if nval and val_points[-1]["step"] != step:
            val_points.append(validate(step))
        kept_step = step
        if d.keep == "best" and best[1] != step:
            with torch.no_grad():
                for p, b in zip(params, best[2], strict=True):
                    p.copy_(b)
            kept_step = best[1]
        final = next(v for v in val_points if v["step"] == kept_step) if nval else None
    finally:
        rss.__exit__()
        freeze.restore()
        model.train(was_training)
    peak = ({"kind": "cuda_max_memory_allocated", "mb": torch.cuda.max_memory_allocated(device) / 2**20}
            if device.type == "cuda" else
            {"kind": "cpu process RSS, peak sampled every 5 ms during distill() (includes the model and data)",
             "mb": rss.peak_mb, "at_start_mb": rss_start, "delta_mb": rss.peak_mb - rss_start,
             "process_lifetime_maxrss_mb": _rss_peak_mb()})
    train_steps = len(losses)
    per_val = [float(np.mean(losses[a["step"]:b["step"]])) for a, b in zip(val_points, val_points[1:], strict=False)
               if b["step"] > a["step"]] if nval else []
    rel = [float((p.detach() - p0).norm() / p0.norm()) for p, p0 in zip(params, init, strict=True)]
    return {
        "method": d.name, "steps": train_steps, "planned_steps": total, "epochs": int(d.epochs),
        "stopped_early": stopped_early, "kept": d.keep, "kept_step": kept_step,
        "autocast": str(amp).removeprefix("torch.") if amp else "none",
        "prefix_cached": states is not None, "suffix_start": suffix.start, "suffix_modules": len(suffix.modules),
        "train_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                       "min": min(losses) if losses else None,
                       "mean_last_10pct": float(np.mean(losses[-max(1, train_steps // 10):])) if losses else None,
                       "mean_between_val_points": per_val},
        "val": val_points, "val_loss_before": val_points[0]["loss"] if nval else None,
        "val_loss_final": final["loss"] if final else None,
        "val_ppl_before": val_points[0]["ppl"] if nval else None, "val_ppl_after": final["ppl"] if final else None,
        "val_ppl_note": "next-token PPL of the student on the distill validation windows (held-out tail of the "
                        "calibration corpus): step 0 = training-free patch, after = kept patch",
        "grad_norm": {"first": grad_norms[0] if grad_norms else None, "max": max(grad_norms, default=None)},
        "patch_rel_change": rel,
        "wall_s": {"total": time.perf_counter() - t_start, "prefix": t_prefix, "train": t_train, "val": t_val,
                   "per_step": t_train / max(1, train_steps)},
        "peak_memory": peak, "teacher_cache": str(teacher.path),
    }


def metrics(info: dict) -> dict:
    """Scalars of a `distill()` summary for `result["metrics"]`."""
    out = {"distill/val_loss_final": info["val_loss_final"], "distill/val_loss_before": info["val_loss_before"],
           "distill/val_ppl_before": info["val_ppl_before"], "distill/val_ppl_after": info["val_ppl_after"],
           "distill/train_loss_last": info["train_loss"]["last"], "distill/steps": info["steps"]}
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["TeacherCache", "Suffix", "build_teacher", "prepare_teacher", "distill", "metrics", "topk_kl",
           "full_student_loss", "check_config", "teacher_key", "distill_windows", "cache_bytes"]
