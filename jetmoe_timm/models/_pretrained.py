""" Build-on-first-load: where the ``pretrained=True`` weights of a JetMoE model come from.

timm has no hook for "build the weights if they cannot be downloaded", so the model entrypoints call
``prepare_pretrained`` before ``build_model_with_cfg``. In order:
  a. a source the user gave (``pretrained_cfg_overlay=dict(file=...)`` / ``state_dict``, ``hf-hub:``,
     ``local-dir:``, train.py's ``--pretrained-path``) is used as is;
  b. the converted ``model.safetensors`` of the cfg's ``hf_hub_id``, from the HF cache or downloaded
     (skipped when the user changed the architecture: the published file is for the default one); a cached
     copy that fails its checks (truncated, content checksum) is downloaded again, or recycled when offline;
  c. otherwise the weights are recycled locally from the tag's predecessor and cached
     (``jetmoe_timm.recycle.build``); the second load reads the cache.
The chosen file is handed to timm as ``pretrained_cfg_overlay=dict(file=...)``.
"""
import logging
import os
from typing import Any, Dict, Optional

from timm.models import resolve_pretrained_cfg

_logger = logging.getLogger(__name__)

# create_model kwargs that do not change the shapes or meaning of the recycled weights
_NON_ARCH_KWARGS = {
    'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'num_classes', 'global_pool', 'in_chans',
    'drop_rate', 'drop_path_rate', 'proj_drop_rate', 'attn_drop_rate', 'pos_drop_rate', 'patch_drop_rate',
    'drop_block_rate', 'moe_drop_rate', 'moe_drop_mode', 'moe_drop_path_rate', 'moe_noise_mult',
    'moe_noise_at_eval', 'moe_combine', 'device', 'dtype', 'features_only', 'out_indices', 'feature_cls',
    'feature_cfg', 'scriptable', 'exportable', 'no_jit', 'bn_momentum', 'bn_eps', 'weight_init', 'fix_init',
    'head_init_scale', 'dynamic_img_size', 'dynamic_img_pad', 'output_stride',
}


def _damage(path: str) -> Optional[str]:
    """Why the weights file ``path`` must not be loaded (truncated, checksum mismatch), or None."""
    from ..export import verify_safetensors
    try:
        verify_safetensors(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _hub_file(hf_hub_id: str, cache_dir: Optional[str]) -> Optional[str]:
    """The converted weights of ``hf_hub_id`` ('org/name[@revision]'): from the HF cache, else downloaded unless
    offline; a damaged cached copy is downloaded again. None when there is no usable file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = hf_hub_id.partition('@')
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"hf_hub_id '{hf_hub_id}' is not a valid Hub repo id ({e}): use 'ORG/NAME' or "
                         f"'ORG/NAME@REVISION'.") from e
    revision = revision or None
    cached = try_to_load_from_cache(repo_id, 'model.safetensors', cache_dir=cache_dir, revision=revision)
    damaged = False
    if isinstance(cached, str):  # the "known missing" sentinel is truthy too
        problem = _damage(cached)
        if problem is None:
            return cached
        damaged = True
        _logger.warning(f'The cached weights of {hf_hub_id} are damaged ({problem}); '
                        + ('cannot download them again offline: recycling locally.' if HF_HUB_OFFLINE
                           else 'downloading them again.'))
    if HF_HUB_OFFLINE:
        return None
    try:
        path = hf_hub_download(repo_id, 'model.safetensors', cache_dir=cache_dir, revision=revision,
                               force_download=damaged)
    except Exception as e:  # not published, unreachable, no such repo: fall back to recycling
        _logger.info(f'No converted weights at {hf_hub_id} ({type(e).__name__}); recycling locally.')
        return None
    problem = _damage(path)
    if problem is not None:
        _logger.warning(f'The weights downloaded from {hf_hub_id} are damaged ({problem}); recycling locally.')
        return None
    return path


def prepare_pretrained(variant: str, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Return ``kwargs`` with ``pretrained_cfg_overlay`` pointing at a weights file for ``variant``."""
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
    if cfg is None or cfg.file or cfg.state_dict is not None or cfg.source in ('hf-hub', 'local-dir') or cfg.url:
        if cfg is not None and cfg.file and str(cfg.file).endswith('.safetensors') and os.path.isfile(cfg.file):
            return dict(kwargs, pretrained_cfg_overlay=_with_input_contract(overlay, cfg.file))
        return kwargs  # a. the user's (or the cfg's own) source

    full = f'{cfg.architecture}.{cfg.tag}'
    arch_changes = {
        k: v for k, v in kwargs.items()
        if k not in _NON_ARCH_KWARGS and (k not in model_args or model_args[k] != v)
    }
    path = None
    if cfg.hf_hub_id and not arch_changes and not os.environ.get('JETMOE_TIMM_PREDECESSOR'):
        path = _hub_file(cfg.hf_hub_id, kwargs.get('cache_dir'))  # b.
    if path is None:
        from ..recycle.build import RECYCLE_SOURCES, cached_recycled_file
        if full not in RECYCLE_SOURCES:
            raise RuntimeError(
                f"No weights for '{full}': they are not in the cache and cannot be downloaded from "
                f"{cfg.hf_hub_id or 'the Hub'}, and this tag is not built by recycling. Connect once, or pass "
                f"pretrained_cfg_overlay=dict(file=...) with a local copy.")
        # c. recycle; the successor is built with the cfg's head so the file matches any num_classes
        build_kwargs = {k: v for k, v in kwargs.items() if k not in _NON_ARCH_KWARGS}
        build_kwargs = dict(model_args, **build_kwargs)
        build_kwargs['num_classes'] = cfg.num_classes
        path = str(cached_recycled_file(full, build_kwargs))
    overlay.update(file=path, custom_load=False)
    return dict(kwargs, pretrained_cfg_overlay=_with_input_contract(overlay, path))


def _with_input_contract(overlay: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``overlay`` plus the preprocessing recorded in a recycled file (its predecessor's mean, std, ...), so that
    timm's data config feeds the weights what they expect; what the user set in ``overlay`` wins."""
    from ..export import read_provenance
    try:
        contract = read_provenance(path).get('input_contract') or {}
    except Exception:  # not a readable safetensors file: timm's own loading reports that
        return overlay
    return dict({k: tuple(v) if isinstance(v, list) else v for k, v in contract.items()}, **overlay)
