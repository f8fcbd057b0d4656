"""Checks of a `conf/distill` section, before any weights load, and the settings they resolve to."""

from __future__ import annotations

import torch
from hydra.utils import get_object

from lp.models import DTYPES

METHODS = ("output_kl",)
KEEP = ("last", "best")
AUTOCAST = ("auto", "bfloat16", "float16", "none")


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
    if d.grad_clip is not None and float(d.grad_clip) <= 0:
        raise ValueError(f"distill.grad_clip={d.grad_clip} must be null or > 0")
    if float(d.prefix_cache_gb) < 0:
        raise ValueError(f"distill.prefix_cache_gb={d.prefix_cache_gb} must be >= 0")
    check_optimizer(d.optimizer, d.scheduler)


def check_patch(d, patch_cfg) -> None:
    """Distillation trains the patch: `patch=none`, or `patch=auto` that can only choose none, is a
    clear error before any weights load. (`patch=auto` may still choose none at every cut at run time:
    then distillation is skipped with a warning, `lp.distill.train.skipped`.)"""
    kind = patch_cfg.kind
    if kind == "none":
        raise ValueError(f"distill={d.name} needs a patch to train, but patch=none; "
                         "use patch=rotate, patch=diag or patch=auto (or distill=none)")
    if kind == "auto" and set(patch_cfg.get("candidates") or []) <= {"none"}:
        raise ValueError(f"distill={d.name} needs a patch to train, but patch=auto with "
                         f"patch.candidates={list(patch_cfg.get('candidates') or [])} can only choose none; "
                         "add a patch kind to patch.candidates (or use distill=none)")


def _check_target(key: str, node) -> None:
    """`node` is a `_partial_: true` Hydra node whose `_target_` imports."""
    target = node.get("_target_")
    if not target or node.get("_partial_") is not True:
        raise ValueError(f"distill.{key} needs a `_target_` and `_partial_: true` (got _target_={target!r}, "
                         f"_partial_={node.get('_partial_')!r}); the loop passes the "
                         f"{'parameters' if key == 'optimizer' else 'optimizer and num_training_steps'}")
    try:
        get_object(target)
    except Exception as e:  # noqa: BLE001  (hydra raises ImportError / ValueError / AttributeError variants)
        raise ValueError(f"distill.{key}._target_={target!r} cannot be imported: {e}") from None


def check_optimizer(opt, sched) -> None:
    """`distill.optimizer` (e.g. torch.optim.AdamW) and `distill.scheduler` (e.g. a transformers
    schedule): importable partials with sane values; the loop fills in `num_training_steps`."""
    _check_target("optimizer", opt)
    _check_target("scheduler", sched)
    if "lr" in opt and not float(opt.lr) > 0:
        raise ValueError(f"distill.optimizer.lr={opt.lr} must be > 0")
    if "weight_decay" in opt and float(opt.weight_decay) < 0:
        raise ValueError(f"distill.optimizer.weight_decay={opt.weight_decay} must be >= 0")
    if "min_lr_rate" in sched and not 0 <= float(sched.min_lr_rate) <= 1:
        raise ValueError(f"distill.scheduler.min_lr_rate={sched.min_lr_rate} must be in [0, 1]")
    if "num_warmup_steps" in sched and int(sched.num_warmup_steps) < 0:
        raise ValueError(f"distill.scheduler.num_warmup_steps={sched.num_warmup_steps} must be >= 0")
    if "num_training_steps" in sched:
        raise ValueError("distill.scheduler.num_training_steps is set by the loop (epochs x steps per epoch); "
                         "remove it")


def resolve_autocast(name: str, device: torch.device, model_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """`auto`: float16 for a float16 model (fp16 checkpoints such as the Llama-2 configs keep their own
    arithmetic), else bfloat16 on CPU and on CUDA devices that support it, else no autocast."""
    if name == "none":
        return None
    if name == "auto":
        if model_dtype == torch.float16:
            return torch.float16
        ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
        return torch.bfloat16 if ok else None
    return DTYPES[name]
