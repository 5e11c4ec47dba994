""" Build-on-first-load: where ``pretrained=True`` weights of a JetMoE model come from.

Filled in by the recycling engine (``jetmoe_timm.recycle``).
"""
from typing import Any, Dict


def prepare_pretrained(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return kwargs
