""" The recycling engine: a dense predecessor model in, the state dict of a JetMoE successor out.

It does not care where weights come from: pass built timm models. Each model family (ViT, ConvNeXt) is one
``FamilySpec`` (``family.py``, registry ``families.py``); the engine reads only the spec and owns what is shared:
statistics, selection, the rule engine, layer-scale folding and retention.

The steps: resize the predecessor to the successor's input (grid, patch size), take activation statistics there
(or at the predecessor's own size), select channels / heads / neurons, fold any layer scale the successor lacks
into the predecessor's weights, apply the plan, and measure what survived (linear CKA of pooled features).
"""
import ctypes
import functools
import inspect
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import adapt_input_conv
from tqdm.auto import tqdm

from ..layers import SpheroMoE, free_no_grad_buffers
from ..version import __version__
from .calibration import (ImageListing, calibration_batches, check_calibration, first_conv, fixed_input_size,
                          input_channels, list_images)
from .families import family_of
from .family import FamilySpec, layer_options_for
from .retention import pooled_features, retention
from .rules import apply_plan, fill_missing_biases, fold_scales, unplaced_tensors
from .selection import METHODS
from .stats import STATISTICS, collect_statistics

__all__ = ['CALIB_SIZES', 'RECIPES', 'RECYCLE_DEFAULTS', 'RETENTION_IMAGES', 'RecycleResult', 'adapt_input_channels',
           'check_nothing_lost', 'check_options', 'check_recipe_family', 'recycle', 'selection_to_json']

RECIPES = ('paper', 'official')
# where the statistics are taken: at the successor's input size and tokens (the predecessor resized to it, the
# default), or at the predecessor's own (e.g. 518 px for DINOv2, although the successor may see 56 px)
CALIB_SIZES = ('successor', 'predecessor')
RETENTION_IMAGES = 256  # at most this many calibration images measure retention


@dataclass
class RecycleResult:
    state_dict: Dict[str, torch.Tensor]  # the successor's own (it is filled in place)
    selection: Dict[str, torch.Tensor]  # index sets: channels, heads, neurons per expert, ...
    provenance: Dict[str, Any]
    fresh_keys: List[str] = field(default_factory=list)  # successor tensors not taken from a predecessor
    model: Optional[nn.Module] = None  # the successor, filled with the recycled weights


def check_options(**options) -> None:
    """Raise a clear error for a recycling request (``recycle``'s options; the defaults for those not given) that
    cannot work, before any model is loaded."""
    o = dict(RECYCLE_DEFAULTS, **options)
    method, recipe, statistic, calib, calib_size = o['method'], o['recipe'], o['statistic'], o['calib'], o['calib_size']
    num_calib, batch_size = o['num_calib'], o['batch_size']
    if calib_size not in CALIB_SIZES:
        raise ValueError(f"Unknown calib_size '{calib_size}'; choose one of {', '.join(CALIB_SIZES)}.")
    if method not in METHODS:
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe '{recipe}'; choose one of {', '.join(RECIPES)}.")
    if statistic not in STATISTICS:
        raise ValueError(f"Unknown statistic '{statistic}'; choose one of {', '.join(STATISTICS)}.")
    if calib == 'weights':
        if METHODS[method].needs_coactivation:
            raise ValueError(f"method '{method}' needs co-activation statistics: pass calibration images.")
        if calib_size != RECYCLE_DEFAULTS['calib_size']:  # silently unused otherwise
            raise ValueError(f"calib_size '{calib_size}' (--calib-size) sizes calibration images, and calib='weights' "
                             f"takes none: drop it, or pass calibration images.")
        return
    if num_calib < 1 or batch_size < 1:
        raise ValueError(f'num_calib ({num_calib}) and batch_size ({batch_size}) must be at least 1.')
    check_calibration(calib)


def adapt_input_channels(model: nn.Module, in_chans: int) -> Optional[int]:
    """Adapt ``model``'s first conv to ``in_chans`` input channels in place, by timm's rule for loading pretrained
    weights at another ``in_chans`` (``adapt_input_conv``: a grey stem repeated and scaled, an RGB one summed).
    Returns the channels it took before, or None where it already takes ``in_chans``."""
    conv = first_conv(model)
    if conv is None or conv.in_channels == in_chans:
        return None
    before = conv.in_channels
    weight = adapt_input_conv(in_chans, conv.weight.detach(), base_chans=before)
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.in_channels = in_chans
    return before


def _check_input(predecessor: nn.Module, successor: nn.Module) -> None:
    for name, t in predecessor.state_dict().items():  # statistics of NaN / inf select by index order, silently
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the predecessor's '{name}' holds NaN or infinite values: recycle from a checkpoint "
                             f"whose weights are finite (a damaged or diverged one?).")
    c_pred, c_succ = input_channels(predecessor), input_channels(successor)
    if c_pred != c_succ:
        raise ValueError(f'the predecessor takes {c_pred} input channels, the successor {c_succ}: build the '
                         f'successor with in_chans={c_pred} (timm adapts pretrained weights to other in_chans '
                         f'when loading them).')
    grid = getattr(getattr(successor, 'patch_embed', None), 'grid_size', None)
    if grid is not None and min(grid) < 1:
        pe = successor.patch_embed
        raise ValueError(f'the successor cannot take any image: img_size {tuple(pe.img_size)} is smaller than its '
                         f'patch_size {tuple(pe.patch_size)}; use img_size >= patch_size.')


def _release_free_memory() -> None:
    """Hand memory the allocator holds but nobody uses back to the OS (glibc keeps freed activations of a
    calibration pass, hundreds of MB, in its arenas). A no-op where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def selection_to_json(selection: Dict[str, torch.Tensor]) -> Dict[str, list]:
    return {k: v.tolist() for k, v in selection.items()}


def _keep_first(batches: Iterator[torch.Tensor], kept: List[torch.Tensor], limit: int) -> Iterator[torch.Tensor]:
    """Pass ``batches`` through, keeping (copies of) up to ``limit`` of their images in ``kept``."""
    n = 0
    for x in batches:
        if n < limit:
            kept.append(x[:limit - n].clone())
            n += kept[-1].shape[0]
        yield x


def _made_again(calib: Any) -> bool:
    """Whether calibration images can be made again, identical, from their seed: synthetic images and a folder's
    can; a Dataset or DataLoader may not give the same images twice."""
    return isinstance(calib, (str, os.PathLike, ImageListing))


def _retention_images(kept: List[torch.Tensor], calib: Any, num_images: int, model: nn.Module, batch_size: int,
                      seed: int, size) -> Callable[[], Iterable[torch.Tensor]]:
    """The images retention is measured on (at most ``RETENTION_IMAGES``, at the successor's size), as a function
    that yields them anew on each call: synthetic images and a folder's are made again from their seed (one
    image batch in memory, not 256 images next to the successor: 154 MB at 224 px); other sources are kept."""
    if kept:
        return lambda: kept
    source = 'synthetic' if calib == 'weights' else calib

    def make():
        batches, _, _ = calibration_batches(source, model, num_images, batch_size, seed, img_size=size)
        n = 0
        while n < RETENTION_IMAGES:
            with warnings.catch_warnings():  # undecodable files were reported by the statistics pass
                warnings.simplefilter('ignore')
                x = next(batches, None)
            if x is None:
                return
            x = x[:RETENTION_IMAGES - n]
            n += len(x)
            yield x
    if _made_again(source):
        return make
    kept = list(make())
    return lambda: kept


def _record_features(features: List[torch.Tensor], limit: int):
    """A forward pre-hook that records the input of a module (the pooled features) for the first ``limit`` rows."""
    def hook(module, args):
        have = sum(len(f) for f in features)
        if have < limit:
            features.append(args[0][:limit - have].detach().float().cpu())
    return hook


def check_nothing_lost(family: FamilySpec, predecessor: nn.Module, successor: nn.Module, seed: int = 0,
                       what: str = 'predecessor') -> None:
    """Refuse a successor that has no place for part of the predecessor (a bias, a norm, a pooling layer), or
    needs a tensor the predecessor lacks, before any statistics are taken: a dry plan from data-free statistics
    names the same tensors as the real one (which index is taken does not change which tensor is read)."""
    # the paper recipe's plan, whatever the request's: one predecessor for every tensor (the official recipe's plan
    # needs its body predecessor, checked on its own); the method and statistic only change which indices are taken
    selection = family.select(predecessor, successor, family.weight_stats(predecessor), method='importance',
                              statistic='l2', seed=seed, recipe='paper')
    plan = family.plan(predecessor, successor, selection, recipe='paper')
    unread, missing = unplaced_tensors(plan, predecessor.state_dict(), family.block_pattern, family.scale_rules)
    # the successor's own tensors that nothing fills, besides its MoE routing and a new head: a norm the predecessor
    # has not (final_norm, embed_norm_layer) would sit freshly initialised inside the recycled computation
    routing = tuple(f'{n}.' for n, m in successor.named_modules() if isinstance(m, SpheroMoE))
    fresh = [k for k in successor.state_dict()
             if k not in plan and not k.startswith(routing) and not re.match(family.new_head, k)]
    fix = lambda keys, predecessor_has: (  # noqa: E731
        layer_options_for(family, keys, predecessor_has)
        or f'the layers of the {what} (no single option is known to place them)')
    listed = lambda keys: ', '.join(keys[:4]) + (' ...' if len(keys) > 4 else '')  # noqa: E731
    if missing or fresh:
        keys = missing or fresh
        raise ValueError(f"the successor has tensors the {what} has nothing for ({listed(keys)}): build it with "
                         f"{fix(keys, False)}.")
    if unread:
        raise ValueError(f"the successor has no place for {len(unread)} {what} tensor(s), e.g. {listed(unread)}: "
                         f"their computation would be lost; build the successor with {fix(unread, True)}.")


def check_recipe_family(recipe: str, family: FamilySpec, name: str) -> None:
    """The official recipe exists only where the official tool has it (ViT)."""
    if recipe == 'official' and family.body_width is None:
        raise ValueError(f"recipe 'official' mirrors the official ViT tool and exists for ViT only; use the paper "
                         f"recipe (recipe='paper', --recipe paper) for {name}.")


def _check_models(family: FamilySpec, predecessor: nn.Module, successor: nn.Module, recipe: str,
                  body_predecessor: Optional[nn.Module], seed: int) -> None:
    """Refuse, before any statistics, a predecessor (and body predecessor) the recipe cannot recycle into
    the successor, in one line that names the fix."""
    family.check(predecessor, successor)
    _check_input(predecessor, successor)
    check_recipe_family(recipe, family, type(successor).__name__)
    if recipe == 'paper':
        check_nothing_lost(family, predecessor, successor, seed)
        return
    if body_predecessor is None:
        raise ValueError("recipe 'official' needs body_predecessor: a dense model of the successor's width "
                         "(e.g. vit_tiny_patch16_224.augreg_in21k for v_jetmoe_tiny).")
    scales = [k for k in successor.state_dict() if any(re.fullmatch(r, k) for r in family.scale_rules)]
    if scales:  # the experts (from one predecessor) would be scaled by the body's (another's) layer scale
        raise ValueError(f"recipe 'official' takes the experts and the body from two predecessors and cannot "
                         f"give a successor with layer scale ('{scales[0]}') one scale for both: build it "
                         f"without init_values, or use recipe='paper'.")
    family.check(body_predecessor, successor)
    if family.body_width(body_predecessor) != family.body_width(successor):
        raise ValueError('the official recipe copies the body verbatim: body_predecessor must have the '
                         'successor\'s width.')
    check_nothing_lost(family, body_predecessor, successor, seed, 'body_predecessor')


def _activation_statistics(family: FamilySpec, stats_model: nn.Module, successor: nn.Module, at_succ: bool,
                           new_bar, calib: Any, num_calib: int, batch_size: int, seed: int, method: str,
                           retention_lists: Optional[Tuple[list, list]]):
    """(statistics of ``stats_model``'s activations on the calibration images, the progress bar made for them):
    at the successor's input size (``at_succ``: ``stats_model`` is the resized predecessor) or the predecessor's
    own. ``retention_lists``: (images, features) to fill with the first calibration images and the predecessor's
    pooled features on them, which the retention figure reuses."""
    size = fixed_input_size(successor)
    batches, total, source = calibration_batches(calib, stats_model, num_calib, batch_size, seed,
                                                 img_size=size if at_succ else None)
    bar = new_bar(total=total + 3)  # its total known from the start (it grew once the batches were counted)
    hook = None
    if retention_lists is not None:  # the predecessor's features on the first images (and those images)
        kept, pred_features = retention_lists
        if not _made_again(calib):  # otherwise they are made again for retention instead of kept
            batches = _keep_first(batches, kept, RETENTION_IMAGES)
        hook = stats_model.get_submodule(family.features_module).register_forward_pre_hook(
            _record_features(pred_features, RETENTION_IMAGES))
    bar.set_postfix_str('statistics')
    try:
        stats = collect_statistics(stats_model, family.probes(stats_model, successor, method=method), batches,
                                   source=source, bar=bar)
    finally:
        if hook is not None:
            hook.remove()
    if at_succ and size is not None:
        stats.source += f':{size[0]}x{size[1]}'
    return stats, bar


def recycle(
        successor: Union[nn.Module, Callable[[], nn.Module]],
        predecessor: nn.Module,
        method: str = 'importance',
        recipe: str = 'paper',
        statistic: str = 'l2',
        calib: Any = 'synthetic',
        num_calib: int = 256,
        batch_size: int = 32,
        seed: int = 0,
        body_predecessor: Optional[nn.Module] = None,
        calib_size: str = 'successor',
        measure_retention: bool = True,
        progress: bool = True,
) -> RecycleResult:
    """Recycle ``predecessor`` (a dense timm model) into weights for ``successor`` (a JetMoE model).

    Args:
        successor: the JetMoE model to initialise, filled in place (``RecycleResult.state_dict`` is its
            ``state_dict()``); its own tensors are kept where nothing is recycled (slot queries, temperatures, a
            head whose classes differ). Or a function that builds it (``RecycleResult.model``): it is called
            once on the meta device for the layout and once for real after the calibration pass, so a large
            successor and the calibration activations are never in memory together (what ``convert`` does). A
            function should seed its own init (calibration data loaders draw from the global RNG before it runs).
        predecessor: the dense timm model whose weights are recycled; it is not modified.
        method: expert neuron selection, one of ``METHODS``.
        recipe: 'paper' (one predecessor, the same channels everywhere) or 'official' (body copied from
            ``body_predecessor``, a same-width model; experts from ``predecessor``, each with its own channels).
        statistic: 'l2', 'l1' or 'freq' activation statistic.
        calib: 'synthetic', a folder of images, a Dataset / DataLoader, or 'weights' (data-free: importance
            from weight norms).
        num_calib / batch_size: calibration images and batch size.
        seed: every random choice derives from it; same inputs + seed give bit-identical weights.
        calib_size: 'successor' (default): statistics at the successor's input size, from the predecessor with
            its position / patch embedding resampled to the successor's grid; 'predecessor': at its own size.
            Either way PIL images get the predecessor's preprocessing (mean, std, interpolation, crop); ready
            tensors are taken as normalised and only resized where a fixed-size (ViT) model needs it.
        measure_retention: add ``provenance['retention']``: linear CKA of predecessor and successor features on
            the calibration images, recycled and at the successor's random init (see ``retention.py``).
        progress: show a progress bar (where stderr is a terminal).
    """
    check_options(method=method, recipe=recipe, statistic=statistic, calib=calib, num_calib=num_calib,
                  batch_size=batch_size, calib_size=calib_size)
    if isinstance(calib, (str, os.PathLike)) and calib not in ('synthetic', 'weights'):
        calib = list_images(calib)  # listed once (an ImageNet-sized folder takes ~30 s), read by every pass
    make_successor = None
    if callable(successor) and not isinstance(successor, nn.Module):
        # its layout (on the meta device, no memory) serves the checks, statistics and selection; the model
        # itself is built after the calibration pass, so the two never hold memory at the same time
        make_successor = successor
        with torch.device('meta'):
            successor = make_successor()
    family = family_of(successor)
    _check_models(family, predecessor, successor, recipe, body_predecessor, seed)

    t0 = time.perf_counter()
    # everything is recycled from the predecessor at the successor's grid; statistics are taken there by default
    pred = family.resize(predecessor, successor)
    size = fixed_input_size(successor)  # None: the successor takes any size; the predecessor's data config rules
    # one bar over the whole recycling: statistics (one step per calibration batch), selection, plan, retention
    # disable=None: on a terminal only; redirected to a file, tqdm's carriage-return frames would fill the log
    new_bar = functools.partial(tqdm, desc=f'recycling {type(successor).__name__}', unit='step',
                                disable=None if progress else True)
    kept: List[torch.Tensor] = []  # calibration images at the successor's size, for the retention figure
    pred_features: List[torch.Tensor] = []  # the predecessor's pooled features on them, from the statistics pass
    if calib == 'weights':
        bar = new_bar(total=3)
        stats = family.weight_stats(pred)
    else:
        at_succ = calib_size == 'successor'
        stats, bar = _activation_statistics(family, pred if at_succ else predecessor, successor, at_succ, new_bar,
                                            calib, num_calib, batch_size, seed, method,
                                            (kept, pred_features) if at_succ and measure_retention else None)
    t_stats = time.perf_counter() - t0

    bar.set_postfix_str('selection')
    selection = family.select(pred, successor, stats, method=method, statistic=statistic, seed=seed, recipe=recipe)
    bar.update()
    bar.set_postfix_str('plan')
    if make_successor is not None:
        _release_free_memory()  # what the calibration pass freed, before the successor is allocated
        successor = make_successor()
    body = family.resize(body_predecessor, successor) if body_predecessor is not None else None
    plan = family.plan(pred, successor, selection, recipe=recipe, body=body)
    target = successor.state_dict()
    scratch = None
    if measure_retention:  # the successor's features at its own init, before the plan overwrites it
        t1 = time.perf_counter()
        images = _retention_images(kept, calib, num_calib if pred_features else min(num_calib, RETENTION_IMAGES),
                                   pred, batch_size, seed, size)
        scratch = pooled_features(successor, images())
        # where a conversion peaks (the successor, the predecessor and a forward's memory, or one take), each of the
        # others is let go: the forward's kept buffers and freed activations (0.13 GB for V-JetMoE-T) before the
        # plan, the folded copies of scaled weights (built after this forward) before the last one
        free_no_grad_buffers()
        _release_free_memory()
        t_retention = time.perf_counter() - t1
    sources = {'main': fill_missing_biases(plan, fold_scales(pred.state_dict(), target, family.scale_rules))}
    if body is not None:
        sources['body'] = fill_missing_biases(plan, fold_scales(body.state_dict(), target, family.scale_rules),
                                              'body')
    fresh = apply_plan(plan, sources, target)  # in place: the successor is never held twice
    del sources
    _release_free_memory()
    bar.update()

    provenance = dict(
        method=method,
        recipe=recipe,
        statistic=statistic,
        calibration=stats.source,
        calibration_images=stats.num_images,
        calib_size=calib_size if calib != 'weights' else None,
        seed=seed,
        jetmoe_timm_version=__version__,
        stats_seconds=round(t_stats, 3),
    )
    if measure_retention:
        t1 = time.perf_counter()
        bar.set_postfix_str('retention')
        reference = torch.cat(pred_features)[:len(scratch)] if pred_features else pooled_features(pred, images())
        provenance['retention'] = retention(reference, pooled_features(successor, images()), scratch)
        free_no_grad_buffers()  # nor after it, in the thread of a pretrained=True load
        provenance['retention_seconds'] = round(t_retention + time.perf_counter() - t1, 3)
    bar.update()
    bar.close()
    provenance['total_seconds'] = round(time.perf_counter() - t0, 3)
    return RecycleResult(state_dict=successor.state_dict(), selection=selection, provenance=provenance,
                         fresh_keys=fresh, model=successor)


# The recycling options' defaults are written once, in recycle()'s signature; the cache, convert and the CLI read them
RECYCLE_DEFAULTS: Dict[str, Any] = {
    name: p.default for name, p in inspect.signature(recycle).parameters.items()
    if name in ('method', 'recipe', 'statistic', 'calib', 'num_calib', 'batch_size', 'seed', 'calib_size')}
