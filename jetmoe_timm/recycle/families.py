""" The registry of model families the recycling engine knows: one ``FamilySpec`` each (see ``family.py``). """
import torch.nn as nn

from . import convnext, vit
from .family import FamilySpec

__all__ = ['FAMILIES', 'family_of']

FAMILIES = (vit.SPEC, convnext.SPEC)


def family_of(successor: nn.Module) -> FamilySpec:
    """The spec of ``successor``'s family; a clear error for a model no family recycles into."""
    for spec in FAMILIES:
        if isinstance(successor, spec.model_cls):
            return spec
    raise ValueError(f'cannot recycle into a {type(successor).__name__}: the successor must be a JetMoE model '
                     f'(e.g. timm.create_model("v_jetmoe_tiny")).')
