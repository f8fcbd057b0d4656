"""The teacher of output-KL distillation: the *dense* model's top-k logits per token, cached on disk.

Computed once before `drop_layers` and keyed by model, data, sampler settings, k and the windows'
content (`teacher_key`), so runs that differ only after the drop (patch kind, distill settings)
share one cache. Shapes: windows `[N, T]` token ids; indices `[N, T, k]` (int32 on disk, int64 in
memory); logits `[N, T, k]` stored in the model's logit dtype, so bf16 logits of a bf16 teacher
round-trip bit-exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from lp import batching, cache, data
from lp.devices import input_device
from lp.models import DTYPES

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DISK_MARGIN = 64 << 20  # bytes kept free beyond the cache estimate
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # 16-bit floats are stored as raw bits


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
        self.dtype = DTYPES[self.meta["values_dtype"]]
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


@torch.no_grad()
def build_teacher(model: nn.Module, windows: torch.Tensor, ntrain: int, k: int, key: dict,
                  root: Path | None = None, batch_size: int = 1, progress: bool = True) -> TeacherCache:
    """Top-k logits of `model` (the dense teacher) on `windows [N, T]`: the `lp.cache` entry
    `teacher/<key_hash(key)>` under `root` (default: the cache root). Reuses a complete entry with the
    same key (a damaged one is rebuilt); otherwise estimates its size, checks free disk (OSError
    before writing any of it) and writes it (`lp.cache.fetch`: once across concurrent runs)."""
    n, seqlen = windows.shape
    head = model.get_output_embeddings()
    if not 1 <= k <= head.weight.shape[0]:
        raise ValueError(f"distill.k={k} must be in [1, {head.weight.shape[0]}] (the model's vocabulary size)")
    est = cache_bytes(n, seqlen, k, head.weight.element_size())

    def build(tmp: Path) -> None:
        _check_disk(tmp.parent, est)
        log.info("teacher cache: writing %d windows x %d tokens, k=%d: ~%.1f MB", n, seqlen, k, est / 2**20)
        _write(model, windows, ntrain, k, key, tmp, batch_size, progress)

    with cache.using(root):
        got = cache.fetch("teacher", key, build, load=lambda p: _open(p, key), name=key_hash(key))
    if got.hit:
        log.info("teacher cache: reusing %s", got.path)
    return got.value


def _check_disk(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN:
        raise OSError(f"not enough disk for the teacher cache: needs ~{need / 2**30:.2f} GB "
                      f"(+{DISK_MARGIN >> 20} MB margin) in {folder}, {free / 2**30:.2f} GB free; "
                      "free space, set LP_CACHE_DIR elsewhere, or lower distill.nsamples/seqlen/k")


def _write(model: nn.Module, windows: torch.Tensor, ntrain: int, k: int, key: dict, out: Path, batch_size: int,
           progress: bool) -> None:
    """Write `ids.npy`, `topk_idx.npy`, `topk_val.npy` and `meta.json` into the empty folder `out`."""
    n, seqlen = windows.shape
    device = input_device(model)
    ids = np.lib.format.open_memmap(out / "ids.npy", "w+", np.int32, (n, seqlen))
    ids[:] = windows.numpy()
    idx_mm = np.lib.format.open_memmap(out / "topk_idx.npy", "w+", np.int32, (n, seqlen, k))
    val_mm, vdtype = None, None
    for i in tqdm(range(0, n, batch_size), desc="teacher top-k", disable=not progress, unit="batch"):
        logits = model(input_ids=windows[i:i + batch_size].to(device), use_cache=False).logits
        top = logits.topk(k, dim=-1)
        if val_mm is None:
            vdtype = top.values.dtype
            np_dtype = np.int16 if vdtype in _BITS else np.float32
            val_mm = np.lib.format.open_memmap(out / "topk_val.npy", "w+", np_dtype, (n, seqlen, k))
        vals = top.values.cpu()
        vals = vals.view(_BITS[vdtype]) if vdtype in _BITS else vals.float()
        val_mm[i:i + batch_size] = vals.numpy()
        idx_mm[i:i + batch_size] = top.indices.cpu().to(torch.int32).numpy()
    for mm in (ids, idx_mm, val_mm):
        mm.flush()
    del ids, idx_mm, val_mm
    meta = {"format": FORMAT_VERSION, "key": key, "hash": key_hash(key), "ntrain": int(ntrain),
            "nval": int(n - ntrain), "seqlen": int(seqlen), "k": int(k),
            "values_dtype": str(vdtype).removeprefix("torch."),
            "bytes": sum(f.stat().st_size for f in out.iterdir()), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def _open(path: Path, key: dict) -> TeacherCache:
    """The entry at `path`; an entry whose meta.json names another key is an error (`lp.cache` rebuilds it)."""
    teacher = TeacherCache(path)
    if teacher.meta["key"] != json.loads(json.dumps(key, default=str)):  # same hash, other identity: never reuse
        raise ValueError(f"teacher cache {path} holds a different key than requested")
    n, t, k = len(teacher), teacher.seqlen, teacher.k
    if teacher.idx.shape != (n, t, k) or teacher.val.shape != (n, t, k):
        raise ValueError(f"teacher cache {path}: arrays of shapes {teacher.idx.shape}, {teacher.val.shape}")
    return teacher


def distill_windows(cfg, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Training windows `[nsamples, seqlen]` from the first (1 - holdout) of `cfg.calib`'s corpus and
    `nval` validation windows from its held-out tail, with provenance: `lp.data.sample_windows`, the
    calibration sampler (document corpora such as pile/c4: only the drawn documents are tokenized)."""
    d, c = cfg.distill, cfg.calib
    train, val, prov = data.sample_windows(tokenizer, c.corpus, c.split, int(d.nsamples), int(d.seqlen), int(d.seed),
                                           c.holdout, cfg.data.root, cfg.data.source, nval=int(d.nval))
    return train, val, {**prov, "nsamples": int(d.nsamples), "nval": int(d.nval), "seqlen": int(d.seqlen),
                        "seed": int(d.seed), "holdout": c.holdout}


def teacher_key(cfg, prov: dict, windows: torch.Tensor) -> dict:
    """Identity of a teacher cache: model, data, sampler settings, k and the windows' content."""
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
    bs = cfg.distill.get("teacher_batch_size") or cfg.distill.batch_size  # null: the training batch size
    bs = batching.resolve(bs, input_device(model), lambda b: model(input_ids=windows[:b].to(input_device(model)),
                                                                   use_cache=False), len(windows), "teacher top-k")
    cache = build_teacher(model, windows, len(train), int(cfg.distill.k), key, batch_size=bs,
                          progress=bool(cfg.distill.get("progress", True)))
    return cache, {**prov, "teacher_cache": str(cache.path), "teacher_cache_mb": round(cache.meta["bytes"] / 2**20, 2),
                   "teacher_batch_size": bs}
