""" The dense predecessor a recycling starts from, loaded from what a user names: a timm name (its pretrained
weights, from the Hub or its cache), 'hf-hub:', a 'local-dir:' folder, or a bare checkpoint file of any head and size
whose architecture is read off its tensors (the family's ``predecessor_args``). Every way it can fail is said in one
line that names the way out (offline: the options that need no network).
"""
import logging
import os
from typing import Any, Dict, Optional

import timm
import torch.nn as nn

from .._names import did_you_mean, quoted
from ..export import is_local_spec, local_path, read_model_config, verify_safetensors
from ..hub_access import hub_offline_unless_reachable, hub_reachable, not_cached_reason
from ..models._pretrained import INPUT_CONTRACT_KEYS, WeightsUnavailableError
from .families import FAMILIES
from .family import UnreadableCheckpoint, UnsupportedPredecessor

__all__ = ['input_contract', 'load_predecessor']

_logger = logging.getLogger(__name__)


def _offline_error(spec: str, err: Exception, body: bool = False) -> WeightsUnavailableError:
    reason = not_cached_reason() if not hub_reachable() else f'{type(err).__name__}: {quoted(err, 200)}'
    if body:  # the official recipe's second predecessor has its own option
        return WeightsUnavailableError(
            f"Cannot load the body predecessor '{spec}' of recipe 'official' ({reason}). Ways out: connect to the "
            f"Hugging Face Hub once (it is cached afterwards); or pass body_predecessor (jetmoe-timm convert: "
            f"--body-predecessor) a local checkpoint file, a 'local-dir:' folder or an 'hf-hub:' name.")
    return WeightsUnavailableError(
        f"Cannot load the predecessor '{spec}' to recycle from ({reason}). Ways out: connect to the Hugging Face "
        f"Hub once (it is cached afterwards); or set JETMOE_TIMM_PREDECESSOR (jetmoe-timm convert: --predecessor) "
        f"to a local checkpoint file, a "
        f"'local-dir:' folder or an 'hf-hub:' name; or point JETMOE_TIMM_CACHE at a cache that already holds the "
        f"recycled weights; or pass pretrained_cfg_overlay=dict(file=...) (train.py: --pretrained-path) with converted "
        f"weights.")


def load_predecessor(spec: str, arch_hint: Optional[str] = None, body: bool = False) -> nn.Module:
    """A dense timm model with pretrained weights from ``spec``.

    ``spec`` is a timm name ('vit_small_patch16_224.augreg_in21k'), 'hf-hub:org/name', 'local-dir:/path' (or just
    the folder's path), or a checkpoint file (.safetensors / .pth / .pt / .bin) holding weights of the
    ``arch_hint`` architecture; ``body``: it is the official recipe's body predecessor (said where it fails).
    """
    given = spec
    if is_local_spec(spec) and not spec.startswith('local-dir:'):
        if os.path.isdir(spec):  # a path to a folder means timm's 'local-dir:'
            spec = f'local-dir:{spec}'
        elif not os.path.exists(spec):
            raise FileNotFoundError(f"predecessor file '{spec}' does not exist: pass an existing .safetensors, .pth, "
                                    f".pt or .bin file, a folder or a timm model name.")
    if spec.startswith('local-dir:'):
        folder = local_path(spec)
        if os.path.isfile(folder):
            raise ValueError(f"predecessor '{given}' is a file, and 'local-dir:' names a folder: pass the file "
                             f"without 'local-dir:' ({folder}).")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"predecessor folder '{folder}' does not exist: pass an existing folder with "
                                    f"model.safetensors and config.json (e.g. written by timm save_for_hf).")
        _check_folder_files(folder, given)
    elif not is_local_spec(spec) and not spec.startswith('hf-hub:') and not os.path.isfile(spec):
        _check_timm_name(spec)
    try:
        if os.path.isfile(spec):
            if arch_hint is None:
                raise ValueError(f"a predecessor file needs its architecture: use 'local-dir:' with a config.json, "
                                 f"or a timm name, instead of the bare file '{spec}'.")
            return _predecessor_from_file(spec, arch_hint)
        with hub_offline_unless_reachable():  # no network: the HF cache answers at once, no retry storm
            return timm.create_model(spec, pretrained=True)
    except (OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError) or 'offline' in str(e).lower() or 'connect' in str(e).lower() \
                or type(e).__name__.endswith(('EntryNotFoundError', 'NotFoundError', 'ConnectionError')) \
                or 'Hub' in str(e) or 'hf_hub' in str(e).lower():
            raise _offline_error(spec, e, body) from None  # the cause is in the message; no chained traceback
        if 'loading state_dict' in str(e):  # missing / unexpected keys or wrong shapes
            raise RuntimeError(
                f"The predecessor weights '{spec}' do not fit the architecture its config.json names "
                f"({_first_load_problem(e)}): pass an unmodified timm checkpoint of that architecture, or a "
                f"'local-dir:' folder whose config.json describes the weights.\n{e}") from e
        raise


def _check_folder_files(folder: str, given: str) -> None:
    """A 'local-dir:' predecessor's config.json and safetensors weights, read as far as needed to know they are
    whole: damaged, timm's loader ends in a parser's message that names neither the file nor the fix."""
    read_model_config(folder, 'pass a folder written by timm save_for_hf (config.json and model.safetensors), or '
                              'the checkpoint file itself.')
    weights = os.path.join(folder, 'model.safetensors')  # timm's local-dir loader takes it before any .pth / .bin
    if os.path.isfile(weights):
        try:
            verify_safetensors(weights, content=False)
        except ValueError as e:
            raise ValueError(f"predecessor folder '{given}': {e}: copy or save the weights again.") from None


def _first_load_problem(e: Exception) -> str:
    """The first missing / unexpected key or wrong shape of a ``load_state_dict`` error, in one short line (the
    CLI shows a message's first line only)."""
    detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
    return detail if len(detail) <= 240 else detail[:240] + '...'


def _check_timm_name(spec: str) -> None:
    """A predecessor named by its timm name: an unknown architecture or tag is said with what comes closest."""
    arch, _, tag = spec.partition('.')
    if not timm.is_model(arch):
        raise ValueError(f"Unknown predecessor '{spec}'{did_you_mean(arch, timm.list_models())}: pass a timm "
                         'model name (e.g. vit_small_patch16_224.augreg_in21k), a checkpoint file or a folder.')
    tags = [t.partition('.')[2] for t in timm.models.get_arch_pretrained_cfgs(arch)]
    if tag and tag not in tags:
        raise ValueError(f"'{arch}' has no pretrained tag '{tag}': pick one of {tags}.")


def _predecessor_from_file(path: str, arch_hint: str) -> nn.Module:
    """A predecessor from a bare checkpoint file with any head (none, 1000, 21k classes) and any size of the
    ``arch_hint`` family: the architecture is read off the tensors (and said in one line), the head dropped."""
    arch = arch_hint.partition('.')[0]
    hint = timm.create_model(arch, device='meta')
    family = next((f for f in FAMILIES if isinstance(hint, f.predecessor_cls)), None)
    if family is None:
        raise ValueError(f"no JetMoE family recycles a {type(hint).__name__} ('{arch_hint}').")
    try:
        state = timm.models.load_state_dict(path)  # .safetensors / .pth / .bin; unwraps 'state_dict' / 'model'
    except Exception as e:  # truncated, not a checkpoint at all, a pickle of something else
        raise ValueError(f"'{path}' cannot be read as a checkpoint ({type(e).__name__}: "
                         f"{quoted(e)}): pass a timm .safetensors, .pth or "
                         f".bin file.") from None
    if any(k.endswith('.slot_query') for k in state):
        raise ValueError(f"'{path}' holds a JetMoE model (SpheroMoE layers), not a dense predecessor: load it as "
                         f"weights (pretrained_cfg_overlay=dict(file=...); inspect --checkpoint), or recycle from the "
                         f"dense checkpoint it was made from.")
    try:
        args = family.predecessor_args(state, hint)
    except UnsupportedPredecessor as e:
        raise ValueError(f"'{path}': {e}") from None
    except UnreadableCheckpoint as e:
        raise ValueError(f"'{path}': {e}: pass a 'local-dir:' folder with its config.json.") from None
    except (KeyError, ValueError, IndexError) as e:
        what = f' (no {e})' if isinstance(e, KeyError) else ''  # a missing tensor; else no block keys at all
        raise ValueError(f"'{path}' is not a timm-format {type(hint).__name__} checkpoint{what}: pass a timm "
                         f"checkpoint, or a 'local-dir:' folder with its config.json.") from None
    # the entrypoint itself: create_model drops None-valued kwargs, so init_values=None / ls_init_value=None (a file
    # without layer scale) would bring back the default of an architecture that has one (DeiT-3, ConvNeXt)
    model = timm.models.model_entrypoint(arch)(pretrained=False, **args)
    classifier = hint.pretrained_cfg.get('classifier')
    head = (f'{classifier}.',) if classifier else ()
    try:
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)},
                                                    strict=False)
        problem = f'missing {missing[:3]}, unexpected {unexpected[:3]}' if missing or unexpected else None
    except RuntimeError as e:  # wrong shapes
        problem = _first_load_problem(e)
    if problem:
        raise ValueError(f"'{path}' does not fit {arch}({_args_line(args)}) read off its tensors ({problem}): pass "
                         f"a 'local-dir:' folder with its config.json.")
    classes = next((v.shape[0] for k, v in state.items() if k.startswith(head) and k.endswith('weight')), 0)
    # a bare file does not say how its images were normalised: the family default's preprocessing is assumed
    # (it drives calibration and is recorded as the successor's), so say which
    contract = ', '.join(f'{k}={tuple(round(x, 4) for x in v) if isinstance(v, (tuple, list)) else v}'
                         for k, v in input_contract(model).items() if k in ('mean', 'std'))
    _logger.warning(f"Predecessor {path}: {arch}({_args_line(args)}) read off its tensors"
                    + (f' (a bare file does not record these, assumed: {family.assumed})' if family.assumed else '')
                    + (f'; its {classes}-class head is not used' if classes else '')
                    + f"; preprocessing assumed from {arch}'s default weights ({contract}): pass a 'local-dir:' "
                      f"folder with the predecessor's config.json if it was trained otherwise.")
    return model.eval()


def _args_line(args: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v}' for k, v in args.items() if k != 'num_classes')


def input_contract(model: nn.Module) -> Dict[str, Any]:
    """The preprocessing ``model``'s weights expect (mean, std, interpolation, crop), from its pretrained cfg."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in INPUT_CONTRACT_KEYS if k in cfg}
