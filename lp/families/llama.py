"""Llama 2/3 (and distilled Llama checkpoints such as DeepSeek-R1-Distill-Llama, SmolLM2)."""

from lp.families.base import Family

FAMILY = Family(name="llama", model_types=("llama",), tiny={})
