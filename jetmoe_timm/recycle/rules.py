""" Declarative recycling: each successor tensor is a ``Take`` of one predecessor tensor.

A plan maps successor keys to ``Take``s. A ``Take`` names its source tensor, an advanced index (which
channels / heads / neurons; a 2-D index stacks experts on a new leading axis), an optional permutation, an
optional leading expert axis to broadcast to, and an optional final transform (e.g. resampling). Keys the
plan does not name keep the successor's own initialisation (slot queries, temperatures, a new head).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ['Take', 'apply_plan', 'expert_takes']


@dataclass
class Take:
    """successor tensor = transform(expand(permute(source[index])))."""
    source: str
    index: Tuple = ()
    permute: Optional[Tuple[int, ...]] = None
    expand: Optional[int] = None
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    predecessor: str = 'main'  # 'main', or 'body' for the official recipe's second predecessor

    def __call__(self, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        t = state[self.source]
        if self.index:
            t = t[self.index]
        if self.permute is not None:
            t = t.permute(*self.permute)
        if self.expand is not None:
            t = t.unsqueeze(0).expand(self.expand, *t.shape)
        if self.transform is not None:
            t = self.transform(t)
        return t.contiguous().clone()


def apply_plan(
        plan: Dict[str, Take],
        sources: Dict[str, Dict[str, torch.Tensor]],
        successor_state: Dict[str, torch.Tensor],
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Build the successor state dict; returns it and the keys that kept their fresh initialisation."""
    unknown = sorted(set(plan) - set(successor_state))
    if unknown:
        raise KeyError(f'recycling plan names keys the successor does not have: {unknown[:5]}')
    out, fresh = {}, []
    for key, target in successor_state.items():
        take = plan.get(key)
        if take is None:
            out[key] = target.detach().clone()
            fresh.append(key)
            continue
        src = sources[take.predecessor]
        if take.source not in src:
            raise KeyError(f"predecessor has no '{take.source}' (needed for successor '{key}')")
        value = take(src).to(target.dtype)
        if value.shape != target.shape:
            raise ValueError(f"recycled '{key}' from '{take.source}' has shape {tuple(value.shape)}, "
                             f"the successor expects {tuple(target.shape)}")
        out[key] = value
    return out, fresh


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
