""" The official MoE Jetpack (MMPretrain) checkpoint layout. """
from typing import Dict

import torch


def is_official_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any('.vit_fc1.' in k or k.endswith('.mlp.phi') for k in state_dict)


def official_to_timm(state_dict, model):
    raise NotImplementedError
