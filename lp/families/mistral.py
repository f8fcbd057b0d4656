"""Mistral: the Llama layout with sliding-window attention."""

from lp.families.base import Family

FAMILY = Family(name="mistral", model_types=("mistral",), tiny={})
