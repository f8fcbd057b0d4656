"""One greedy generation sample (`eval.generate`): does the pruned model still speak?"""

from __future__ import annotations

import torch

from lp.devices import input_device


def check_generate(gen_cfg) -> None:
    """Validate `eval.generate` (null, or prompt / max_new_tokens / in_multirun) before any work."""
    if gen_cfg is None:
        return
    prompt, n = gen_cfg.get("prompt"), gen_cfg.get("max_new_tokens")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"eval.generate.prompt={prompt!r} must be a non-empty string (or eval.generate=null)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"eval.generate.max_new_tokens={n!r} must be a positive integer")
    if not isinstance(gen_cfg.get("in_multirun", False), bool):
        raise ValueError(f"eval.generate.in_multirun={gen_cfg.get('in_multirun')!r} must be true or false")


def generation_wanted(gen_cfg) -> bool:
    """`eval.generate` is set, and this is a single run or `eval.generate.in_multirun` is true."""
    if not gen_cfg:
        return False
    from hydra.core.hydra_config import HydraConfig

    multirun = HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    return not multirun or bool(gen_cfg.get("in_multirun", False))


def greedy_sample(model, tokenizer, prompt: str, max_new_tokens: int) -> dict:
    """Greedy (`do_sample=False`) continuation of `prompt` with the KV cache, as `generate` serves it.
    Returns {prompt, completion (new text only), new_tokens, max_new_tokens}."""
    check_generate({"prompt": prompt, "max_new_tokens": max_new_tokens})
    device = input_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)
    new = out[0, enc["input_ids"].shape[1]:]
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": int(new.numel()), "max_new_tokens": max_new_tokens}
