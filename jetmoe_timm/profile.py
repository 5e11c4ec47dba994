""" Model size and cost: parameters and MACs.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2) with timm's fused
attention switched off, because the counter does not see CPU scaled-dot-product attention.
"""
from contextlib import contextmanager
from typing import Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ._modes import eval_mode

__all__ = ['count_params', 'count_macs']


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _unfused_attention(model: nn.Module):
    """Switch timm attention modules to explicit matmuls (countable), then restore."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, 'fused_attn')]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


@torch.no_grad()
def count_macs(model: nn.Module, input_size: Tuple[int, int, int] = (3, 224, 224)) -> int:
    """Multiply-accumulates of one image's inference forward pass."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    with eval_mode(model), _unfused_attention(model), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2
