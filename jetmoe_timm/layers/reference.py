""" A plain, readable SpheroMoE forward: one loop over experts, one equation per line.

It reads the parameters of a ``SpheroMoE`` module and recomputes the layer without batching tricks. Tests
compare the optimised layer against it, and the benchmark times it to show what batching buys.
Noise, dropout and drop path are left out: call it on a layer in eval mode.
"""
import torch

from .entmax import entmax15
from .sphero_moe import SpheroMoE

__all__ = ['sphero_moe_reference']


def _expert(x: torch.Tensor, fc1_w, fc1_b, fc2_w, fc2_b, act) -> torch.Tensor:
    """One expert MLP on its slots: (S, d) -> (S, d)."""
    return act(x @ fc1_w + fc1_b) @ fc2_w + fc2_b


def sphero_moe_reference(layer: SpheroMoE, x: torch.Tensor) -> torch.Tensor:
    """Recompute ``layer(x)`` for x (B, N, d) in eval mode with a Python loop over experts."""
    B, N, d = x.shape
    E, S = layer.num_experts, layer.slots_per_expert
    key = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    query = layer.slot_norm(layer.slot_query)  # (E, S, d)
    query = query / (query.norm(dim=-1, keepdim=True) + 1e-6)
    # routing in float32 at least: bf16 / fp16 widened, float64 kept
    logits = torch.einsum('bnd,esd->bnes', key, query).to(torch.promote_types(x.dtype, torch.float32))
    temperature = layer.temperature
    dispatch = (logits / temperature[0]).softmax(dim=1)  # over tokens
    combine_logits = (logits / temperature[-1]).reshape(B, N, E * S)
    if layer.combine == 'entmax15':
        combine = entmax15(combine_logits, dim=-1).reshape(B, N, E, S)
    else:
        combine = combine_logits.softmax(dim=-1).reshape(B, N, E, S)

    act = next(iter(layer.expert_groups().values())).act
    out = torch.zeros_like(x)
    for e in range(E):
        if e < layer.num_core_experts:
            group, i = layer.core_experts, e
        else:
            group, i = layer.univ_experts, e - layer.num_core_experts
        for b in range(B):
            slots = dispatch[b, :, e, :].t() @ x[b]  # (S, d)
            y = _expert(slots, group.fc1.weight[i], group.fc1.bias[i], group.fc2.weight[i], group.fc2.bias[i], act)
            out[b] += combine[b, :, e, :] @ y
    return out
