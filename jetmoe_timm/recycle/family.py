""" A model family, described once for the recycling engine: ``FamilySpec`` (the registry is ``families.py``).

A family module (``vit.py``, ``convnext.py``) holds what is particular to one dense architecture: how to check a
predecessor, where to measure it, how to pick channels / heads / neurons, and which successor tensor comes from
which predecessor tensor. It ends with one ``SPEC``, through which the engine, the cache and ``convert`` reach
it. Adding a family takes its model module as well (``models/``), this module with its ``SPEC`` and one line in
``FAMILIES``: docs/architecture.md lists the steps.
"""
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Protocol, Sequence

import torch
import torch.nn as nn
from timm.layers.create_act import _ACT_LAYER_DEFAULT

from ..layers import SpheroMoE

__all__ = ['FamilySpec', 'LayerOption', 'UnreadableCheckpoint', 'UnsupportedPredecessor', 'check_activation',
           'layer_args', 'layer_options_for']


class UnreadableCheckpoint(ValueError):
    """A bare checkpoint whose tensors do not tell its architecture (``predecessor_args``); the message says why."""


class UnsupportedPredecessor(ValueError):
    """A predecessor the family's plan cannot take (``check``, or ``predecessor_args`` where a bare checkpoint's
    tensors already show it); the message says why and what to pass instead."""


class LayerOption(NamedTuple):
    """A model option that decides whether some tensors exist: keys matching ``pattern`` (at the key's start) are
    there with ``name=present`` and not with ``name=absent``."""
    pattern: str
    name: str
    present: Any
    absent: Any

    def option(self, present: bool) -> str:
        return f'{self.name}={self.present if present else self.absent!r}'


# The recycling steps a family provides, in the order the engine runs them. ``pred`` is the dense predecessor,
# ``succ`` the JetMoE successor (on the meta device in the dry run that checks a plan before any statistics); the
# engine passes everything after them by keyword.

class CheckFn(Protocol):
    def __call__(self, pred: nn.Module, succ: nn.Module) -> None:
        """Raise one clear line (ValueError) when ``pred`` cannot be recycled into ``succ``."""


class ResizeFn(Protocol):
    def __call__(self, pred: nn.Module, succ: nn.Module) -> nn.Module:
        """``pred`` in ``succ``'s input layout (grid, patch size, tokens): a changed copy, or ``pred`` itself."""


class ProbesFn(Protocol):
    def __call__(self, pred: nn.Module, succ: nn.Module, *, method: str) -> List[Any]:
        """Where statistics are measured (``stats.Probe``s of the resized predecessor), co-activation where the
        selection ``method`` needs it."""


class SelectFn(Protocol):
    def __call__(self, pred: nn.Module, succ: nn.Module, stats: Any, *, method: str, statistic: str, seed: int,
                 recipe: str) -> Dict[str, torch.Tensor]:
        """Statistics (``stats[module, statistic]``) -> the index sets: channels, heads, each expert's neurons, as
        flat {name: LongTensor} (stored for audit)."""


class PlanFn(Protocol):
    def __call__(self, pred: nn.Module, succ: nn.Module, sel: Dict[str, torch.Tensor], *, recipe: str,
                 body: Optional[nn.Module] = None) -> Dict[str, Any]:
        """Index sets -> {successor key: ``rules.Take``} for every tensor recycled; ``body``: the official recipe's
        same-width predecessor (resized), whose body is taken whole."""


@dataclass(frozen=True)
class FamilySpec:
    model_cls: type  # the JetMoE successor class (a JetMoEMixin subclass)
    predecessor_cls: type  # the timm class of its dense predecessors
    recycled_from: Mapping[str, Mapping[str, str]]  # pretrained tag -> dict(predecessor=..., [body_predecessor=...])
    # the predecessor's timm arguments read off a bare checkpoint's tensors, f(state, hint model on meta); raises
    # UnreadableCheckpoint where the tensors fit more than one architecture, or none
    predecessor_args: Callable[[Mapping[str, Any], nn.Module], dict]
    # the recycling steps (the Protocols above)
    check: CheckFn
    resize: ResizeFn
    probes: ProbesFn
    select: SelectFn
    plan: PlanFn
    weight_stats: Callable[[nn.Module], Any]  # data-free statistics from the weights (a WeightStatistics class)
    # declarative parts
    scale_rules: Mapping[str, str]  # layer-scale key regex -> the linear it scales (folded when the successor has none)
    features_module: str  # its input is the pooled pre-logits feature (retention figure)
    # the prefix of one block's keys: a block the plan takes nothing from is left out by a shallower successor
    block_pattern: str
    # what a bare checkpoint file cannot tell and ``predecessor_args`` assumes, said with the arguments read off it
    assumed: str = ''
    # the residual width of a model, for the official tool's two-predecessor recipe ('official'): None where that
    # recipe does not exist for the family
    body_width: Optional[Callable[[nn.Module], int]] = None
    # the successor tensors that may start fresh besides its MoE routing (regex, matched at the key's start): a new
    # head, i.e. the classifier and what a successor may add before it (ViT's attention pool, ConvNeXt's hidden layer)
    new_head: str = r'head\.'
    # the options that decide which tensors a model has: what a bare checkpoint's keys say (``layer_args``), and
    # what places a tensor only one side has (``layer_options_for``)
    layer_options: Sequence[LayerOption] = ()


def layer_options_for(family: FamilySpec, keys: Sequence[str], predecessor_has: bool) -> str:
    """The successor options (``FamilySpec.layer_options``) that would place ``keys``, which only the predecessor
    (``predecessor_has``) or only the successor has: '' where the table names none."""
    found = dict.fromkeys(o.option(predecessor_has) for k in keys for o in family.layer_options
                          if re.match(o.pattern, k))
    return ', '.join(found)


def layer_args(options: Sequence[LayerOption], keys: Iterable[str], like: Iterable[str]) -> dict:
    """The ``options`` a checkpoint's ``keys`` show, where they differ from those of the model with keys ``like``
    (the architecture they are given to): {name: present or absent}."""
    def read(names):
        names = list(names)
        out = {}
        for o in options:  # rows naming one option say the same of any checkpoint timm makes: the first decides
            out.setdefault(o.name, o.present if any(re.match(o.pattern, k) for k in names) else o.absent)
        return out
    ours, theirs = read(keys), read(like)
    return {k: v for k, v in ours.items() if v != theirs[k]}


def _activation(mlp: nn.Module) -> nn.Module:
    """The activation of a dense MLP, or of a SpheroMoE layer's experts."""
    if isinstance(mlp, SpheroMoE):
        return next(iter(mlp.expert_groups().values())).act
    return mlp.act


def _same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-6)


def check_activation(pred_mlp: nn.Module, succ_mlp: nn.Module) -> None:
    """Refuse a successor whose MLPs apply another function than the predecessor's (e.g. GELU where CLIP's MLPs
    use QuickGELU): recycled neurons would compute something else. Compared on values, so timm's and torch's
    classes of one function agree."""
    a, b = _activation(pred_mlp), _activation(succ_mlp)
    x = torch.linspace(-8., 8., 321)
    if _same_function(a, b, x):
        return
    # timm's name for the predecessor's function, found the same way
    name = next((k for k, cls in _ACT_LAYER_DEFAULT.items() if _same_function(cls(), a, x)), None)
    fix = f"act_layer='{name}' (--model-kwargs act_layer={name})" if name else 'the same activation'
    raise ValueError(f"the predecessor's MLPs use {a}, the successor's {b}: build the successor with {fix}.")
