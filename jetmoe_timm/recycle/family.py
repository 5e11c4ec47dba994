""" A model family, described once for the recycling engine: ``FamilySpec`` (the registry is ``families.py``).

A family module (``vit.py``, ``convnext.py``) holds what is particular to one dense architecture: how to check a
predecessor, where to measure it, how to pick channels / heads / neurons, and which successor tensor comes from
which predecessor tensor. It ends with one ``SPEC``; the engine, the cache, ``convert`` and ``push`` only ever
see the spec. Adding a family = one module with a ``SPEC`` + one line in ``FAMILIES`` (docs/architecture.md).
"""
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch.nn as nn

__all__ = ['FamilySpec']


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_cls: type  # the JetMoE successor class (a JetMoEMixin subclass)
    predecessor_cls: type  # the timm class of its dense predecessors
    recycled_from: Mapping[str, Mapping[str, str]]  # pretrained tag -> dict(predecessor=..., [body_predecessor=...])
    # the predecessor's timm arguments read off a bare checkpoint's tensors, f(state, hint model on meta)
    predecessor_args: Callable[[Mapping[str, Any], nn.Module], dict]
    # recycling steps, each f(pred, succ, ...): see vit.py for the contract of each
    check: Callable[[nn.Module, nn.Module], None]  # raise one clear line when pred cannot be recycled into succ
    resize: Callable[[nn.Module, nn.Module], nn.Module]  # the predecessor at the successor's input size
    probes: Callable[..., list]  # where statistics are measured
    select: Callable[..., dict]  # statistics -> index sets (channels, heads, neurons per expert)
    plan: Callable[..., dict]  # index sets -> successor key: Take
    weight_stats: Callable[[nn.Module], Any]  # data-free statistics from the weights
    body_width: Callable[[nn.Module], int]
    # declarative parts
    scale_rules: Mapping[str, str]  # layer-scale key regex -> the linear it scales (folded when the successor has none)
    features_module: str  # its input is the pooled pre-logits feature (retention figure)
    official_recipe: bool = False  # the official tool's two-predecessor recipe exists for this family
