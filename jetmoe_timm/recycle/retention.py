""" How much of the predecessor survived recycling, measured in seconds before any fine-tuning.

The figure is the linear CKA (Kornblith et al. 2019) between the predecessor's and the successor's pooled
features (``forward_head(..., pre_logits=True)``) on the same calibration images, next to the same figure for the
successor's random initialisation, which is what training from scratch would start from. CKA is invariant to
rotations and isotropic scaling of either side, so features of different widths compare directly.
"""
from typing import Dict, Iterable

import torch
import torch.nn as nn

from .._modes import eval_mode

__all__ = ['linear_cka', 'pooled_features', 'retention']


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` (n, d1) and ``y`` (n, d2) of the same n inputs, in [0, 1]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.t() @ x).square().sum()
    norm = (x.t() @ x).square().sum().sqrt() * (y.t() @ y).square().sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


class _Pooled(nn.Module):
    """The pooled pre-logits features of a timm classifier as its forward: (B, C, H, W) -> (B, num_features).
    A model without pooling (``global_pool=''``) gives its tokens (B, N, C) or map (B, C, H, W): averaged here."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return x.mean(1) if x.ndim == 3 else x.mean((2, 3)) if x.ndim == 4 else x


@torch.no_grad()
def pooled_features(model: nn.Module, images: Iterable[torch.Tensor], chunk: int = 8) -> torch.Tensor:
    """Pooled features (n, num_features) of ``model`` in eval mode on ``images`` (batches, run ``chunk`` images
    at a time)."""
    wrapper = _Pooled(model)
    first = next(model.parameters())  # images go to the model's device and dtype (a bf16 model)
    with eval_mode(model):
        # a few images at a time: the figure needs no speed, and a large successor's activations stay small
        feats = [wrapper(c.to(first.device, first.dtype)).float().cpu() for x in images for c in x.split(chunk)]
    return torch.cat(feats)


def retention(reference: torch.Tensor, recycled: torch.Tensor, scratch: torch.Tensor) -> Dict[str, float]:
    """{'cka': recycled successor vs predecessor, 'cka_scratch': the successor's own init vs predecessor,
    'images': n, 'features': d}, from pooled features (n, d) on the same images: the predecessor's (``reference``),
    the successor's after recycling and at its random init. With n not well above d, linear CKA reads high for
    any pair of models: the two figures then differ little."""
    return dict(cka=round(linear_cka(reference, recycled), 4), cka_scratch=round(linear_cka(reference, scratch), 4),
                images=int(reference.shape[0]), features=int(recycled.shape[1]))
