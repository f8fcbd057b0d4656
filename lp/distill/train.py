"""The training loop of output-KL distillation: only the patch matrices of the pruned model train.

Loss: KL(teacher || student) on the teacher's top-k support per token (`topk_kl`). The optimizer
and the LR schedule come from `distill.optimizer` / `distill.scheduler` (Hydra `_target_` +
`_partial_: true`; by default AdamW and transformers' cosine schedule with a floor,
`get_cosine_with_min_lr_schedule_with_warmup`, stepped once per optimisation step over
`epochs x ceil(ntrain / batch_size)` steps). Validation (held-out teacher rows) at step 0, every
`val_every` steps and at the end; `keep: best` restores the patch with the lowest validation loss.
"""

from __future__ import annotations

import inspect
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from torch import nn
from tqdm.auto import tqdm

from lp.devices import input_device
from lp.distill.config import resolve_autocast
from lp.distill.student import PrefixStates, Suffix, topk_kl
from lp.distill.teacher import TeacherCache
from lp.evaluate.ppl import token_nll

log = logging.getLogger(__name__)


@dataclass
class Freeze:
    flags: dict

    @classmethod
    def only(cls, model: nn.Module, trainable: list[nn.Parameter]) -> Freeze:
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        return cls(flags)

    def restore(self):
        for p, flag in self.flags.items():
            if p.requires_grad != flag and not p.is_inference():  # offloaded placeholders (accelerate) are
                p.requires_grad_(flag)                          # re-made on every onload: nothing to restore


def make_scheduler(node, optimizer, total: int):
    """`distill.scheduler` (a partial) called with the optimizer and, if it takes it, `num_training_steps`."""
    factory = instantiate(node)
    if "num_training_steps" in inspect.signature(factory.func).parameters:
        return factory(optimizer, num_training_steps=total)
    return factory(optimizer)


class Loop:
    """Optimisation steps and validation of one `distill()` call (the student `suffix`, its
    trainable `params`, the `teacher` cache and the `distill` settings `d`)."""

    def __init__(self, suffix: Suffix, params: list, teacher: TeacherCache, d, device, tracker, progress: bool):
        self.suffix, self.params, self.teacher, self.d = suffix, params, teacher, d
        self.device, self.tracker, self.progress = device, tracker, progress
        self.amp = resolve_autocast(d.autocast, device, suffix.head.weight.dtype)  # auto follows an fp16 model
        self.bs, self.ntrain, self.nval = int(d.batch_size), teacher.ntrain, teacher.nval
        self.total = int(d.epochs) * math.ceil(self.ntrain / self.bs)
        self.states: PrefixStates | None = None
        self.t_val = 0.0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean top-k KL and next-token PPL of the student on the validation rows."""
        kls, nlls = [], []
        for i in range(self.ntrain, self.ntrain + self.nval, self.bs):
            rows = list(range(i, min(i + self.bs, self.ntrain + self.nval)))
            ids, idx, tl = self.teacher.get(rows)
            with self.autocast():
                hn = self.suffix.hidden(self.states.get(rows, ids))
                kls.append(topk_kl(self.suffix.logits_at(hn, idx.to(self.device)), tl.to(self.device)).item()
                           * len(rows))
                logits = self.suffix.logits(hn)
            nlls += [token_nll(lg[:-1], w[1:].to(self.device)).mean().item() for lg, w in zip(logits, ids, strict=True)]
        return {"loss": sum(kls) / self.nval, "ppl": math.exp(sum(nlls) / self.nval)}

    def validate(self, step: int) -> dict:
        t = time.perf_counter()
        v = {"step": step, **self.evaluate()}
        self.t_val += time.perf_counter() - t
        if self.tracker is not None:
            self.tracker.log({"distill/val_loss": v["loss"], "distill/val_ppl": v["ppl"]}, step=step)
        return v

    def step(self, rows, opt, sched, scaler) -> tuple[float, float]:
        """One optimisation step on teacher rows `rows`: `(loss, grad norm before clipping)`."""
        ids, idx, tl = self.teacher.get(rows)
        h = self.states.get(rows, ids)
        with self.autocast():
            loss = topk_kl(self.suffix.logits_at(self.suffix.hidden(h), idx.to(self.device)), tl.to(self.device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip = float(self.d.grad_clip) if self.d.grad_clip else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(self.params, clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        return loss.item(), float(gn)

    def fit(self) -> dict:
        """All epochs (or until early stopping); returns the curves and the kept step."""
        d, params = self.d, self.params
        opt = instantiate(d.optimizer)(params)
        sched = make_scheduler(d.scheduler, opt, self.total)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16 and self.device.type == "cuda")
        gen = torch.Generator().manual_seed(int(d.seed))
        val_every = int(d.val_every)
        val_points = [self.validate(0)] if self.nval else []
        best = (val_points[0]["loss"], 0, [p.detach().clone() for p in params]) if self.nval else None
        bad_evals, stopped_early, losses, grad_norms, step, ema = 0, False, [], [], 0, None
        t_train0, t_val0 = time.perf_counter(), self.t_val
        bar = tqdm(total=self.total, desc="distill", disable=not self.progress, unit="step")
        for _epoch in range(int(d.epochs)):
            perm = torch.randperm(self.ntrain, generator=gen).tolist()
            for b in range(0, self.ntrain, self.bs):
                lv, gn = self.step(perm[b:b + self.bs], opt, sched, scaler)
                step += 1
                losses.append(lv)
                grad_norms.append(gn)
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}")
                if self.tracker is not None:
                    self.tracker.log({"distill/loss": lv, "distill/lr": sched.get_last_lr()[0],
                                      "distill/grad_norm": gn}, step=step)
                if self.nval and ((val_every and step % val_every == 0) or step == self.total):
                    v = self.validate(step)
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
        t_train = time.perf_counter() - t_train0 - (self.t_val - t_val0)  # optimisation steps only
        if self.nval and val_points[-1]["step"] != step:
            val_points.append(self.validate(step))
        kept_step = self.keep(best, step)
        return {"losses": losses, "grad_norms": grad_norms, "val_points": val_points, "step": step,
                "kept_step": kept_step, "stopped_early": stopped_early, "t_train": t_train}

    def keep(self, best, step: int) -> int:
        """`keep: best`: copy the best validation patch back; returns the step whose patch is kept."""
        if self.d.keep == "best" and best[1] != step:
            with torch.no_grad():
                for p, b in zip(self.params, best[2], strict=True):
                    p.copy_(b)
            return best[1]
        return step


def _rss_peak_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)


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
    device = input_device(model)
    loop = Loop(suffix, params, teacher, d, device, tracker, progress)
    init = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    freeze = Freeze.only(model, params)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(int(d.seed))
    try:
        t0 = time.perf_counter()  # hidden states entering the first patch: computed once, kept in RAM when they fit
        loop.states = PrefixStates(suffix, teacher, loop.bs, float(d.prefix_cache_gb) * 2**30)
        t_prefix = time.perf_counter() - t0
        fit = loop.fit()
    finally:
        freeze.restore()
        model.train(was_training)
    peak = ({"kind": "cuda_max_memory_allocated", "mb": torch.cuda.max_memory_allocated(device) / 2**20}
            if device.type == "cuda" else
            {"kind": "cpu process lifetime max RSS (ru_maxrss, includes the model, data and everything before "
                     "distill; a step's own peak: benchmarks/bench_distill.py)", "mb": _rss_peak_mb()})
    rel = [float((p.detach() - p0).norm() / p0.norm()) for p, p0 in zip(params, init, strict=True)]
    times = {"total": time.perf_counter() - t_start, "prefix": t_prefix, "train": fit["t_train"], "val": loop.t_val}
    return summary(d, loop, fit, rel, times, peak)


def summary(d, loop: Loop, fit: dict, rel: list[float], times: dict, peak: dict) -> dict:
    """`result["distill"]` from a finished `Loop.fit()`."""
    losses, val_points, nval = fit["losses"], fit["val_points"], loop.nval
    train_steps = len(losses)
    final = next(v for v in val_points if v["step"] == fit["kept_step"]) if nval else None
    per_val = [float(np.mean(losses[a["step"]:b["step"]])) for a, b in zip(val_points, val_points[1:], strict=False)
               if b["step"] > a["step"]] if nval else []
    gns = fit["grad_norms"]
    return {
        "method": d.name, "steps": train_steps, "planned_steps": loop.total, "epochs": int(d.epochs),
        "stopped_early": fit["stopped_early"], "kept": d.keep, "kept_step": fit["kept_step"],
        "autocast": str(loop.amp).removeprefix("torch.") if loop.amp else "none",
        "prefix_cached": loop.states.cached, "suffix_start": loop.suffix.start,
        "suffix_modules": len(loop.suffix.modules),
        "train_loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                       "min": min(losses) if losses else None,
                       "mean_last_10pct": float(np.mean(losses[-max(1, train_steps // 10):])) if losses else None,
                       "mean_between_val_points": per_val},
        "val": val_points, "val_loss_before": val_points[0]["loss"] if nval else None,
        "val_loss_final": final["loss"] if final else None,
        "val_ppl_before": val_points[0]["ppl"] if nval else None, "val_ppl_after": final["ppl"] if final else None,
        "val_ppl_note": "next-token PPL of the student on the distill validation windows (held-out tail of the "
                        "calibration corpus): step 0 = training-free patch, after = kept patch",
        "grad_norm": {"first": gns[0] if gns else None, "max": max(gns, default=None)},
        "patch_rel_change": rel,
        "wall_s": {**times, "per_step": times["train"] / max(1, train_steps)},
        "peak_memory": peak, "teacher_cache": str(loop.teacher.path),
    }


def skipped(d, patch_kind: str, patches: dict) -> tuple[dict, str] | None:
    """`(result["distill"], warning)` when distillation `d` (= cfg.distill) is configured but has
    nothing to train, else None. That happens when `patch=auto` chose no patch at any cut (held-out
    NLL, `lp.verify.choose_per_cut`): the run goes on training-free and unpatched, and the skip is a
    loud warning (logged with `!!!`, for `result["warnings"]`), not an error. Settings that can never
    give a patch (`patch=none`) are rejected before any weights load (`lp.distill.config.check_patch`)."""
    if d.name == "none" or patches or patch_kind != "auto":
        return None
    reason = "patch=auto chose no patch at any cut: nothing to train"
    warning = f"distill={d.name} skipped: {reason}; the run is training-free and unpatched"
    log.warning("!!! %s", warning)
    return {"skipped": reason}, warning


def metrics(info: dict) -> dict:
    """Scalars of a `distill()` summary for `result["metrics"]`."""
    out = {"distill/val_loss_final": info["val_loss_final"], "distill/val_loss_before": info["val_loss_before"],
           "distill/val_ppl_before": info["val_ppl_before"], "distill/val_ppl_after": info["val_ppl_after"],
           "distill/train_loss_last": info["train_loss"]["last"], "distill/steps": info["steps"]}
    return {k: v for k, v in out.items() if v is not None}
