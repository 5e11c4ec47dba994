""" How much of the predecessor survived recycling, measured in seconds before any fine-tuning.

The figure is the linear CKA (Kornblith et al. 2019) between the predecessor's and the successor's pooled
features (``forward_head(..., pre_logits=True)``) on the same calibration images, next to the same figure for the
successor's random initialisation, which is what training from scratch would start from. CKA is invariant to
rotations and isotropic scaling of either side, so features of different widths compare directly.
"""
from typing import Dict, Iterable, Mapping, Optional

import torch
import torch.nn as nn
from torch.func import functional_call

__all__ = ['linear_cka', 'pooled_features', 'retention']


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x`` (n, d1) and ``y`` (n, d2) of the same n inputs, in [0, 1]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.t() @ x).square().sum()
    norm = (x.t() @ x).square().sum().sqrt() * (y.t() @ y).square().sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


class _Pooled(nn.Module):
    """The pooled pre-logits features of a timm classifier as its forward: (B, C, H, W) -> (B, num_features)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@torch.no_grad()
def pooled_features(model: nn.Module, images: Iterable[torch.Tensor],
                    state_dict: Mapping[str, torch.Tensor] = None) -> torch.Tensor:
    """Pooled features (n, num_features) of ``model`` in eval mode, optionally with the weights ``state_dict``
    swapped in for the call (no copy of the model)."""
    was_training = model.training
    model.eval()
    wrapper = _Pooled(model)
    device = next(model.parameters()).device
    params = None if state_dict is None else {f'model.{k}': v.to(device) for k, v in state_dict.items()}
    try:
        feats = [(wrapper(x.to(device)) if params is None else functional_call(wrapper, params, (x.to(device),)))
                 .float().cpu() for x in images]
    finally:
        model.train(was_training)
    return torch.cat(feats)


def retention(predecessor: nn.Module, successor: nn.Module, state_dict: Mapping[str, torch.Tensor],
              images: Iterable[torch.Tensor], reference: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """{'cka': recycled successor vs predecessor, 'cka_scratch': the successor's own init vs predecessor,
    'images': n} on ``images`` (batches at the successor's input size). ``reference``: the predecessor's pooled
    features on them, if already at hand (the statistics pass records them), else computed."""
    images = list(images)
    ref = pooled_features(predecessor, images) if reference is None else reference.float().cpu()
    return dict(cka=round(linear_cka(ref, pooled_features(successor, images, state_dict)), 4),
                cka_scratch=round(linear_cka(ref, pooled_features(successor, images)), 4),
                images=int(ref.shape[0]))
