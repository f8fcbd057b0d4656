"""Baichuan 2 (remote code): Llama-like layers with a fused `self_attn.W_pack` (q, k, v in one matrix),
so the width surgery that edits q/k/v separately does not apply; the LM head is a normalised `NormHead`."""

from lp.families.base import Family

FAMILY = Family(name="baichuan", model_types=("baichuan",), attn=None, trust_remote_code=True)
