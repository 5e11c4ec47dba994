""" Declarative recycling: each successor tensor is a ``Take`` of one predecessor tensor.

A family states, in a table of ``Rule``s keyed by parameter-name patterns (in the spirit of vmoe's upcycling
rules), which index set indexes each dimension of each tensor: residual channels, attention dims, hidden neurons.
``plan_from_rules`` turns the table and a selection into a plan: successor key -> ``Take``. A ``Take`` names its
source tensor, an advanced index (a 2-D index stacks experts on a new leading axis), an optional permutation and
an optional leading expert axis to broadcast to. Keys the plan does not name keep the successor's own
initialisation (slot queries, temperatures, a new head).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import re

import torch

__all__ = ['Rule', 'Take', 'apply_plan', 'expert_takes', 'fill_missing_biases', 'fold_scales', 'plan_from_rules',
           'unplaced_tensors']


@dataclass
class Take:
    """successor tensor = expand(permute(source[index])) * scale."""
    source: str
    index: Tuple = ()
    permute: Optional[Tuple[int, ...]] = None
    expand: Optional[int] = None
    predecessor: str = 'main'  # 'main', or 'body' for the official recipe's second predecessor
    # broadcast over the taken tensor (a ViT's queries with narrower heads); not compared: tensors have no ==
    scale: Optional[torch.Tensor] = field(default=None, compare=False)

    def __call__(self, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The taken tensor: a new tensor where it is indexed, else a view of the source (copy it to keep it)."""
        t = state[self.source]
        if self.index:
            t = t[self.index]
        if self.permute is not None:
            t = t.permute(*self.permute)
        if self.expand is not None:
            t = t.unsqueeze(0).expand(self.expand, *t.shape)
        if self.scale is not None:
            t = t * self.scale.to(t.dtype)
        return t


@dataclass(frozen=True)
class Rule:
    """Successor keys matching ``pattern`` take the same-named predecessor tensor, indexed dimension by dimension.

    ``axes`` names, per leading dimension, the index set that selects it ('{0}', '{1}', ... are filled with the
    pattern's groups, e.g. 'blocks.{0}.mlp'), or None for the whole dimension; a leading '...' indexes the last dimension
    instead (tokens and position embeddings: (1, N, d)).
    """
    pattern: str
    axes: Tuple[Optional[str], ...]

    def __post_init__(self):
        named = [i for i, a in enumerate(self.axes) if a not in (None, '...')]
        if '...' in self.axes and (self.axes[0] != '...' or len(self.axes) != 2):
            raise ValueError(f"rule '{self.pattern}': '...' goes first, with exactly one named axis after it")
        if named and named != list(range(named[0], named[-1] + 1)):
            # advanced indices split by a slice would move their dimensions to the front (NumPy's rule)
            raise ValueError(f"rule '{self.pattern}': the named axes {self.axes} must be adjacent")


def plan_from_rules(rules, keys, indices: Dict[str, torch.Tensor], predecessor: str = 'main') -> Dict[str, Take]:
    """A Take for every key in ``keys`` that a rule matches (the first that does), indexed by ``indices``."""
    compiled = [(re.compile(r.pattern), r.axes) for r in rules]
    plan = {}
    for key in keys:
        for rx, axes in compiled:
            m = rx.fullmatch(key)
            if m is None:
                continue
            groups = m.groups()
            sets = [None if a in (None, '...') else indices[a.format(*groups)] for a in axes]
            if axes and axes[0] == '...':
                index = (Ellipsis, sets[1])
            else:  # an open mesh: each index set varies along its own dimension
                named = [i for i, t in enumerate(sets) if t is not None]
                index = tuple(slice(None) if t is None else t.view([-1 if j == i else 1 for j in named])
                              for i, t in enumerate(sets))
            plan[key] = Take(key, index, predecessor=predecessor)
            break
    return plan


@torch.no_grad()
def apply_plan(
        plan: Dict[str, Take],
        sources: Dict[str, Dict[str, torch.Tensor]],
        successor_state: Dict[str, torch.Tensor],
) -> List[str]:
    """Fill the successor's tensors (``successor_state``, e.g. its ``state_dict()``) in place, one take at a time,
    so a conversion holds the successor once plus one taken tensor; returns the keys that kept their fresh
    initialisation. Every take is checked before anything is written: a failed plan leaves the successor as it
    was."""
    unknown = sorted(set(plan) - set(successor_state))
    if unknown:
        raise KeyError(f'recycling plan names keys the successor does not have: {unknown[:5]}')
    for key, take in plan.items():
        src = sources[take.predecessor]
        if take.source not in src:
            raise KeyError(f"predecessor has no '{take.source}' (needed for successor '{key}')")
        shape = _taken_shape(take, src[take.source])
        if shape != tuple(successor_state[key].shape):
            raise ValueError(f"recycled '{key}' from '{take.source}' has shape {shape}, "
                             f"the successor expects {tuple(successor_state[key].shape)}")
    for key, take in plan.items():
        successor_state[key].copy_(take(sources[take.predecessor]))  # casts to the successor's dtype
    return [k for k in successor_state if k not in plan]


def _taken_shape(take: Take, source: torch.Tensor) -> Tuple[int, ...]:
    """The shape ``take`` gives on ``source``, worked out on the meta device (no data is touched)."""
    meta = {take.source: torch.empty(source.shape, dtype=source.dtype, device='meta')}
    index = tuple(i.to('meta') if isinstance(i, torch.Tensor) else i for i in take.index)
    return tuple(Take(take.source, index, take.permute, take.expand)(meta).shape)


def expert_takes(prefix: str, src: str, neurons: torch.Tensor, channels: torch.Tensor) -> Dict[str, Take]:
    """Experts of one path: fc1 (E, d', h) / fc2 (E, h, d') from the predecessor MLP ``src``.

    ``channels`` is (d',) shared by all experts, or (E, d') per expert (official recipe).
    """
    E = neurons.shape[0]
    per_expert = channels.ndim == 2
    ch = channels[:, None, :] if per_expert else channels[None, None, :]
    n = neurons[:, :, None]
    return {
        f'{prefix}.fc1.weight': Take(f'{src}.fc1.weight', (n, ch), permute=(0, 2, 1)),  # W1[n, c] -> (E, d', h)
        f'{prefix}.fc1.bias': Take(f'{src}.fc1.bias', (neurons,)),
        f'{prefix}.fc2.weight': Take(f'{src}.fc2.weight', (ch, n)),  # W2[c, n] -> (E, h, d')
        f'{prefix}.fc2.bias': (Take(f'{src}.fc2.bias', (channels,)) if per_expert
                               else Take(f'{src}.fc2.bias', (channels,), expand=E)),
    }


def fold_scales(
        state: Dict[str, torch.Tensor],
        successor_state: Dict[str, torch.Tensor],
        scale_rules: Dict[str, str],
) -> Dict[str, torch.Tensor]:
    r"""The predecessor ``state`` with each per-channel output scale the successor lacks folded into its linear.

    ``scale_rules`` maps a regex of scale keys (layer scale ``gamma``, shape (d,)) to the prefix of the linear
    whose output it scales (e.g. ``r'blocks\.(\d+)\.ls2\.gamma'`` -> ``r'blocks.\1.mlp.fc2'``): y = g * (W x + b)
    = (diag(g) W) x + g b, so ``W`` and ``b`` absorb ``g`` and the successor needs no scale. Scales the successor
    has too are left alone (copied as they are); scales it has that the predecessor lacks become ones, so the
    recycled block computes what the predecessor's did. Returns a new dict; ``state``'s tensors are not changed.
    """
    out = dict(state)
    for pattern, linear in scale_rules.items():
        rx = re.compile(pattern)
        for key in [k for k in state if rx.fullmatch(k)]:
            if key in successor_state:
                continue
            g = state[key]
            prefix = rx.sub(linear, key)
            out[f'{prefix}.weight'] = state[f'{prefix}.weight'] * g[:, None]
            if f'{prefix}.bias' in state:
                out[f'{prefix}.bias'] = state[f'{prefix}.bias'] * g
        for key in [k for k in successor_state if rx.fullmatch(k) and k not in state]:
            weight = state.get(f'{rx.sub(linear, key)}.weight')
            if weight is not None:  # of the predecessor's width: the plan selects channels from it
                out[key] = torch.ones(weight.shape[0], dtype=weight.dtype)
    return out


def _missing_bias(take: Take, state: Dict[str, torch.Tensor]) -> bool:
    """A taken bias the predecessor's layer does not have (built with bias=False): it computes as zeros."""
    return (take.source not in state and take.source.endswith('.bias')
            and take.source[:-len('bias')] + 'weight' in state)


def fill_missing_biases(plan: Dict[str, Take], state: Dict[str, torch.Tensor],
                        predecessor: str = 'main') -> Dict[str, torch.Tensor]:
    """``state`` with a zero bias for each bias the plan takes from a layer without one (a checkpoint built with
    qkv_bias=False into a successor with qkv bias): the recycled layer computes exactly what the predecessor's
    did. Returns a new dict; ``state``'s tensors are not changed."""
    out = dict(state)
    for take in plan.values():
        if take.predecessor == predecessor and _missing_bias(take, state):
            weight = state[take.source[:-len('bias')] + 'weight']
            out[take.source] = weight.new_zeros(weight.shape[0])
    return out


def unplaced_tensors(plan: Dict[str, Take], state: Dict[str, torch.Tensor], block_pattern: str,
                     scale_rules: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """What a plan would lose or lack: predecessor tensors (``state``) that no take reads, and sources the plan
    reads that the predecessor does not have (a missing bias or layer scale excepted: zeros and ones, see
    ``fill_missing_biases`` and ``fold_scales``).

    Left out by design, and not listed: the head (the successor gets its own where the classes differ), layer
    scales (folded into their linear by ``fold_scales``), and whole blocks the plan reads nothing of (a shallower
    successor; ``block_pattern`` matches the prefix of one block's keys). Anything else unread is computation of
    the predecessor's that the successor would silently lose (a bias, a norm, an attention pool)."""
    read = {t.source for t in plan.values() if t.predecessor == 'main'}
    block = re.compile(block_pattern)
    read_blocks = {m.group(0) for k in read if (m := block.match(k))}
    scale = [re.compile(r) for r in scale_rules]
    unread = []
    for key in state:
        m = block.match(key)
        if (key in read or key.startswith('head.') or any(r.fullmatch(key) for r in scale)
                or (m is not None and m.group(0) not in read_blocks)):
            continue
        unread.append(key)
    missing = sorted({t.source for t in plan.values() if t.predecessor == 'main' and t.source not in state
                      and not _missing_bias(t, state) and not any(r.fullmatch(t.source) for r in scale)})
    return unread, missing
