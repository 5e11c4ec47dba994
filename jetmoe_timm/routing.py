""" Routing inspection: what the SpheroMoE layers of a model did on its last forward pass.

Opt-in and free when off: a layer records only while its ``capture_routing`` flag is set.

    set_routing_capture(model, True)
    model(images)
    info = routing_info(model)   # {'blocks.6.mlp': {'dispatch': (B, N, M), 'combine': ..., ...}, ...}
"""
from typing import Dict

import torch
import torch.nn as nn

from .layers import SpheroMoE

__all__ = ['moe_layers', 'set_routing_capture', 'routing_info']


def moe_layers(model: nn.Module) -> Dict[str, SpheroMoE]:
    """Every SpheroMoE layer of a model, by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SpheroMoE)}


def set_routing_capture(model: nn.Module, enable: bool = True) -> None:
    """Start (or stop) recording routing in every SpheroMoE layer; stopping also frees the records."""
    for layer in moe_layers(model).values():
        layer.capture_routing = enable
        if not enable:
            layer.last_routing = None


def routing_info(model: nn.Module) -> Dict[str, Dict[str, torch.Tensor]]:
    """Routing of the last forward pass per layer.

    Each entry holds ``dispatch`` (B, N, M), ``combine`` (B, N, M), ``core_out``/``univ_out`` (B, N, d), whose
    sum is the layer output before expert drop path, ``slot_contrib`` (B, M), plus ``num_core_slots`` (int tensor)
    to split M. N counts the layer's tokens: H * W for ConvNeXt, whose layer output is (B, H, W, d).
    """
    out = {}
    for name, layer in moe_layers(model).items():
        if layer.last_routing is None:
            raise RuntimeError(
                f"No routing recorded for '{name}': call set_routing_capture(model, True) and run a forward pass.")
        out[name] = dict(
            layer.last_routing,
            num_core_slots=torch.tensor(layer.num_core_experts * layer.slots_per_expert),
        )
    return out
