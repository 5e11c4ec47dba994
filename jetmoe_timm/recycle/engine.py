""" The recycling engine: a dense predecessor model in, the state dict of a JetMoE successor out.

It does not care where weights come from: pass built timm models. Each model family (ViT, ConvNeXt)
contributes a small module with ``check``, ``probes``, ``select``, ``plan`` and ``WeightStats``; statistics,
selection, the rule engine and caching are shared.
"""
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from ..version import __version__
from .calibration import calibration_batches, check_calibration
from .rules import apply_plan
from .selection import METHODS
from .stats import STATISTICS, collect_statistics

__all__ = ['RECIPES', 'RecycleResult', 'check_options', 'recycle']

RECIPES = ('paper', 'official')


@dataclass
class RecycleResult:
    state_dict: Dict[str, torch.Tensor]
    selection: Dict[str, torch.Tensor]  # index sets: channels, heads, neurons per expert, ...
    provenance: Dict[str, Any]
    fresh_keys: List[str] = field(default_factory=list)  # successor tensors not taken from a predecessor


def _family(successor: nn.Module):
    from ..models.vit_jetmoe import VisionTransformerJetMoE
    from . import vit
    families = [(VisionTransformerJetMoE, vit)]
    try:
        from ..models.convnext_jetmoe import ConvNeXtJetMoE
        from . import convnext
        families.append((ConvNeXtJetMoE, convnext))
    except ImportError:
        pass
    for cls, module in families:
        if isinstance(successor, cls):
            return module
    raise ValueError(f'cannot recycle into a {type(successor).__name__}: the successor must be a JetMoE model '
                     f'(e.g. timm.create_model("v_jetmoe_tiny")).')


def check_options(method: str = 'importance', recipe: str = 'paper', statistic: str = 'l2', calib: Any = 'synthetic',
                  num_calib: int = 1, batch_size: int = 1) -> None:
    """Raise a clear error for a recycling request that cannot work, before any model is loaded."""
    if method not in METHODS:
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}.")
    if statistic not in STATISTICS:
        raise ValueError(f"Unknown statistic '{statistic}'; choose one of {', '.join(STATISTICS)}.")
    if calib == 'weights':
        if method == 'graph':
            raise ValueError("method 'graph' needs co-activation statistics: pass calibration images.")
        return
    if num_calib < 1 or batch_size < 1:
        raise ValueError(f'num_calib ({num_calib}) and batch_size ({batch_size}) must be at least 1.')
    check_calibration(calib)


def _input_channels(model: nn.Module) -> Optional[int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # the stem / patch embedding
    return conv.in_channels if conv is not None else None


def _check_input(predecessor: nn.Module, successor: nn.Module) -> None:
    c_pred, c_succ = _input_channels(predecessor), _input_channels(successor)
    if c_pred != c_succ:
        raise ValueError(f'the predecessor takes {c_pred} input channels, the successor {c_succ}: build the '
                         f'successor with in_chans={c_pred} (timm adapts pretrained weights to other in_chans '
                         f'when loading them).')
    grid = getattr(getattr(successor, 'patch_embed', None), 'grid_size', None)
    if grid is not None and min(grid) < 1:
        pe = successor.patch_embed
        raise ValueError(f'the successor cannot take any image: img_size {tuple(pe.img_size)} is smaller than its '
                         f'patch_size {tuple(pe.patch_size)}; use img_size >= patch_size.')


def selection_to_json(selection: Dict[str, torch.Tensor]) -> Dict[str, list]:
    return {k: v.tolist() for k, v in selection.items()}


def recycle(
        successor: nn.Module,
        predecessor: nn.Module,
        method: str = 'importance',
        recipe: str = 'paper',
        statistic: str = 'l2',
        calib: Any = 'synthetic',
        num_calib: int = 256,
        batch_size: int = 32,
        seed: int = 0,
        body_predecessor: Optional[nn.Module] = None,
        progress: bool = True,
) -> RecycleResult:
    """Recycle ``predecessor`` (a dense timm model) into weights for ``successor`` (a JetMoE model).

    Args:
        successor: the JetMoE model to initialise; its own tensors are kept where nothing is recycled
            (slot queries, temperatures, a head whose classes differ).
        predecessor: the dense timm model whose weights are recycled.
        method: expert neuron selection, one of ``METHODS``.
        recipe: 'paper' (one predecessor, the same channels everywhere) or 'official' (body copied from
            ``body_predecessor``, a same-width model; experts from ``predecessor``, each with its own channels).
        statistic: 'l2', 'l1' or 'freq' activation statistic.
        calib: 'synthetic', a folder of images, a Dataset / DataLoader, or 'weights' (data-free: importance
            from weight norms).
        num_calib / batch_size: calibration images and batch size.
        seed: every random choice derives from it; same inputs + seed give bit-identical weights.
        progress: show a progress bar.
    """
    check_options(method, recipe, statistic, calib, num_calib, batch_size)
    family = _family(successor)
    family.check(predecessor, successor)
    _check_input(predecessor, successor)
    if recipe == 'official':
        if not getattr(family, 'HAS_OFFICIAL_RECIPE', False):
            raise ValueError(f"recipe 'official' mirrors the official ViT tool and exists for ViT only; "
                             f"use recipe='paper' for {type(successor).__name__}.")
        if body_predecessor is None:
            raise ValueError("recipe 'official' needs body_predecessor: a dense model of the successor's width "
                             "(e.g. vit_tiny_patch16_224.augreg_in21k for v_jetmoe_tiny).")
        family.check(body_predecessor, successor)
        if family.body_width(body_predecessor) != family.body_width(successor):
            raise ValueError('the official recipe copies the body verbatim: body_predecessor must have the '
                             'successor\'s width.')

    t0 = time.perf_counter()
    if calib == 'weights':
        stats = family.WeightStats(predecessor)
    else:
        batches, total, source = calibration_batches(calib, predecessor, num_calib, batch_size, seed)
        stats = collect_statistics(predecessor, family.probes(predecessor, successor, method), batches,
                                   total=total, source=source, progress=progress)
    t_stats = time.perf_counter() - t0

    selection = family.select(predecessor, successor, stats, method, statistic, seed, recipe)
    plan = family.plan(predecessor, successor, selection, recipe)
    sources = {'main': predecessor.state_dict()}
    if body_predecessor is not None:
        sources['body'] = body_predecessor.state_dict()
    state_dict, fresh = apply_plan(plan, sources, successor.state_dict())

    provenance = dict(
        method=method,
        recipe=recipe,
        statistic=statistic,
        calibration=stats.source,
        calibration_images=stats.num_images,
        seed=seed,
        jetmoe_timm_version=__version__,
        stats_seconds=round(t_stats, 3),
        total_seconds=round(time.perf_counter() - t0, 3),
    )
    return RecycleResult(state_dict=state_dict, selection=selection, provenance=provenance, fresh_keys=fresh)
