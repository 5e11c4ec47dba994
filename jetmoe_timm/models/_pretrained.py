""" Build-on-first-load: where the ``pretrained=True`` weights of a JetMoE model come from.

timm has no hook for "build the weights if they cannot be downloaded", so the model entrypoints call
``prepare_pretrained`` before ``build_model_with_cfg``. In order:
  a. a source the user gave (``pretrained_cfg_overlay=dict(file=...)`` / ``state_dict``, ``hf-hub:``,
     ``local-dir:``, train.py's ``--pretrained-path``) is used as is;
  b. the converted ``model.safetensors`` of the cfg's ``hf_hub_id``, from the HF cache or downloaded
     (skipped when the user changed the architecture: the published file is for the default one); a cached
     copy that fails its checks (truncated, content checksum) is downloaded again, or recycled when offline.
     An ``hf_hub_id`` the user gave (not the tag's) is their source: used whatever the kwargs, and when it
     cannot be had that is an error, never recycled weights in its place;
  c. otherwise the weights are recycled locally from the tag's predecessor and cached, by the builder the
     recycling package registers (``register_weight_builder``: models never import the recycling code);
     the second load reads the cache.
The chosen file is handed to timm as ``pretrained_cfg_overlay=dict(file=...)``.

"Did the user change the architecture?" is answered by the tensors: the model with and without the user's
kwargs is built on the meta device and the state-dict shapes (and attention head counts) compared, leaving out the
first conv and the classifier, which timm adapts on load (``in_chans``, ``num_classes``).
"""
import inspect
import itertools
import logging
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import safetensors.torch
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath, PatchDropout
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from .._names import quoted
from ..export import read_provenance, verify_safetensors
from ..hub_access import hub_reachable, not_cached_reason

__all__ = ['HF_ORG', 'INPUT_CONTRACT_KEYS', 'PAPER_CFG', 'WeightsUnavailableError', 'architecture_signature',
           'build_jetmoe', 'prepare_pretrained', 'recorded_input_contract', 'recycled_cfgs', 'recycled_note',
           'refuse_damaged', 'register_weight_builder', 'weight_shapes']

_logger = logging.getLogger(__name__)

HF_ORG = 'jetmoe-timm'  # the Hub organisation of every tag's converted weights
# the predecessor's preprocessing, which its weights were trained for: the successor inherits it
INPUT_CONTRACT_KEYS = ('mean', 'std', 'interpolation', 'crop_pct', 'crop_mode')
# the pretrained-cfg fields every JetMoE tag shares
PAPER_CFG = dict(
    license='apache-2.0',
    paper_ids='arXiv:2406.04801',
    paper_name='MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks',
    origin_url='https://github.com/Adlith/MoE-Jetpack',
)


def recycled_cfgs(cfg: Callable[..., Dict[str, Any]], recycled_from: Dict[str, Dict[str, str]]) -> Dict[str, Dict]:
    """The pretrained cfgs of a family's recycled tags, from its ``RECYCLED_FROM`` table (tag -> dict(predecessor,
    [body_predecessor], [remark])): headless inits on the Hub under ``HF_ORG``, taking their predecessor's
    preprocessing (mean, std, crop, interpolation), since recycling keeps its features."""
    cfgs = {}
    for tag, source in recycled_from.items():
        pred = source['predecessor']
        data = {k: v for k, v in timm.models.get_pretrained_cfg(pred).to_dict().items()
                if k in ('input_size', *INPUT_CONTRACT_KEYS)}
        remark = f" ({source['remark']})" if source.get('remark') else ''
        # recycle()'s default method and recipe, which build the tags (models never import the recycling code:
        # tests/test_recycle.py checks that the two agree)
        cfgs[tag] = cfg(hf_hub_id=f'{HF_ORG}/{tag}', num_classes=0, **data,
                        notes=(recycled_note(f'{pred}{remark}', 'importance', 'paper'),))
    return cfgs


# what a recycled build's classifier is (``recycled_note``): none, freshly initialised, or the predecessor's
_CLASSIFIER_NOTES = {'none': 'No classifier', 'fresh': 'A freshly initialised classifier',
                     'taken': "The predecessor's classifier (same classes and pooling)"}


def recycled_note(predecessor: str, method: str, recipe: str, classifier: str = 'none') -> str:
    """A pretrained cfg's note on recycled weights: what they were built from, how, what their ``classifier`` is
    (a ``_CLASSIFIER_NOTES`` key) and that they need a fine-tune (the registered tags' and every build's, which
    describes its own predecessor and options)."""
    return (f'Recycled init, not fine-tuned: built from {predecessor} by {method} sampling ({recipe} recipe). '
            f'{_CLASSIFIER_NOTES[classifier]}; fine-tune before use.')

# arguments of timm's model factory (create_model / build_model_with_cfg and its feature options), not of the
# model class; device / dtype are the model's but the comparison builds on the meta device anyway
_FACTORY_KWARGS = ({p for f in (timm.create_model, build_model_with_cfg) for p in inspect.signature(f).parameters}
                   | {'features_only', 'out_indices', 'feature_cls', 'device', 'dtype'}) - {'kwargs'}
# modules that can come and go without changing what the weights mean (dropout rates of 0 give Identity)
_MEANINGLESS = (nn.Dropout, DropPath, PatchDropout, nn.Identity)
# model arguments timm itself adapts pretrained weights to: they never call for other weights
_ADAPTED_ON_LOAD = {'num_classes', 'in_chans'}
# ... and those whose position grid the family's checkpoint filter resamples on load: with nothing else changed the
# Hub copy serves them (as timm serves its own checkpoints at other sizes); with other changes they are built for
_RESAMPLED_ON_LOAD = {'img_size'}

class WeightsUnavailableError(RuntimeError):
    """No pretrained weights can be had (offline, nothing cached): the message names the ways out. The model
    entrypoints re-raise it without the frames inside jetmoe_timm, which add nothing to it."""


# (tag 'arch.tag', model kwargs) -> path of weights built for them; registered by jetmoe_timm.recycle
_weight_builder: Optional[Callable[[str, Dict[str, Any]], os.PathLike]] = None


def register_weight_builder(builder: Callable[[str, Dict[str, Any]], os.PathLike]) -> None:
    """Register the function that builds (and caches) the weights of a tag no file can be found for."""
    global _weight_builder
    _weight_builder = builder


def weight_shapes(state_dict: Mapping[str, torch.Tensor], skip=()) -> Dict[str, Tuple[int, ...]]:
    """{key: shape} of a state dict, leaving out keys starting with ``skip`` (a prefix or a tuple of them)."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(skip)}


def architecture_signature(model: nn.Module, skip=()) -> Dict[str, Any]:
    """What a model's weights mean: every tensor's shape, every module's type (post-norm blocks, another
    activation) and the head count of every attention (a (3d, d) qkv is the same shape for 3 or 6 heads, but
    recycled weights differ: heads are selected whole). Dropout and drop path, which come and go with their
    rates, are left out, and so are keys starting with ``skip``."""
    out: Dict[str, Any] = dict(weight_shapes(model.state_dict(), skip))
    for name, m in model.named_modules():
        if not isinstance(m, _MEANINGLESS) and not (skip and name.startswith(skip)):
            out[f'{name}#type'] = type(m).__name__
        if isinstance(getattr(m, 'num_heads', None), int):
            out[f'{name}#heads'] = m.num_heads
    return out


def _signature(model_cls, model_kwargs: Dict[str, Any], skip) -> Dict[str, Any]:
    """``architecture_signature`` of ``model_cls(**model_kwargs)``, built on the meta device (no memory)."""
    with torch.device('meta'):
        model = model_cls(**model_kwargs)
    return architecture_signature(model, skip)


def _architecture_kwargs(model_cls, cfg, model_args: Dict[str, Any], user: Dict[str, Any]) -> Dict[str, Any]:
    """The user's model kwargs that change the weights' keys or shapes; {} when none do.

    Each kwarg is left out in turn: one whose absence fails the build (it goes with another, e.g. embed_dim with
    num_heads) or changes the shapes matters; dropout rates and routing options do not, so they never split the
    cache of recycled weights."""
    user = {k: v for k, v in user.items() if k not in _ADAPTED_ON_LOAD and model_args.get(k, object()) != v}
    if not user:
        return {}
    skip = tuple(p for p in (cfg.first_conv, cfg.classifier) if p)
    asked = _signature(model_cls, dict(model_args, **user), skip)
    if asked == _signature(model_cls, model_args, skip):
        return {}

    def signature(kwargs):
        try:
            return _signature(model_cls, dict(model_args, **kwargs), skip)
        except (ValueError, AssertionError, TypeError, RuntimeError):
            return None

    kept = {k: v for k, v in user.items() if signature({j: w for j, w in user.items() if j != k}) != asked}
    # two kwargs that make the same change (global_pool='token' and fc_norm=False both drop fc_norm) each look
    # idle with the other there: each of the others that still changes the architecture is added back
    current = signature(kept)
    for k, v in user.items():
        if k not in kept:
            added = signature(dict(kept, **{k: v}))
            if added != current:
                kept[k], current = v, added
    return kept if current == asked else user


def _damage(path: str) -> Optional[str]:
    """Why the weights file ``path`` must not be loaded (truncated, checksum mismatch), or None."""
    try:
        verify_safetensors(path)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def refuse_damaged(path: str) -> None:
    """The one-line refusal of a weights file that must not be loaded (``_damage``), before anything is built."""
    problem = _damage(path)
    if problem is not None:
        raise ValueError(f'Refusing to load damaged weights: {problem}. Convert or download them again.')


def _given_weights(cfg, cache_dir: Optional[str] = None) -> Optional[str]:
    """The local safetensors file behind a user's source, when there is one to check before timm loads it: a
    ``file`` (train.py's --pretrained-path), a ``local-dir:`` folder's, or an ``hf-hub:`` repo's ``model.safetensors``
    in ``cache_dir`` (the HF cache by default), downloaded first when the Hub answers."""
    if cfg.file:  # a file, or a local-dir: folder (timm keeps the folder there)
        path = str(cfg.file)
        if not os.path.exists(path):  # timm's loader raises a FileNotFoundError without a message
            raise FileNotFoundError(f"pretrained weights file '{path}' (pretrained_cfg_overlay file=..., train.py "
                                    f"--pretrained-path) does not exist: pass the path of an existing weights file.")
        path = os.path.join(path, 'model.safetensors') if os.path.isdir(path) else path
    elif cfg.source == 'hf-hub' and cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        repo_id, _, revision = cfg.hf_hub_id.partition('@')
        if hub_reachable():  # the call timm's load makes next: the same file, which it then finds cached
            try:
                path = hf_hub_download(repo_id, 'model.safetensors', revision=revision or None, cache_dir=cache_dir)
            except Exception:  # no model.safetensors (a .bin repo), no such repo: timm's own load reports it
                return None
        else:
            path = try_to_load_from_cache(repo_id, 'model.safetensors', cache_dir=cache_dir,
                                          revision=revision or None)
            path = path if isinstance(path, str) else None  # the "known missing" sentinel is truthy too
    else:
        return None
    return path if path and path.endswith('.safetensors') and os.path.isfile(path) else None


# what a failed Hub download means, by huggingface_hub's error class (names: their modules move between versions)
_HUB_REASONS = {
    'GatedRepoError': 'a gated repo: request access on its page and log in',
    'RepositoryNotFoundError': 'no such repo, or a private one and no token with access was sent',
    'RevisionNotFoundError': 'no such revision',
    'RemoteEntryNotFoundError': 'the repo has no model.safetensors',
    'EntryNotFoundError': 'the repo has no model.safetensors',
}


def _why(e: BaseException) -> str:
    """A failed download in one short line: what it means, the HTTP status, the error class."""
    names = [c.__name__ for c in type(e).__mro__]
    meaning = next((_HUB_REASONS[n] for n in names if n in _HUB_REASONS), None)
    response = getattr(e, 'response', None)
    status = f'HTTP {response.status_code}, ' if getattr(response, 'status_code', None) else ''
    return f'{meaning or quoted(e, 200) or "failed"}; {status}{type(e).__name__}'


# default repos whose fallback to recycling was already explained in this process (said once, not per load)
_told_fallback = set()


def _fallback(hf_hub_id: str, why: str) -> None:
    """The tag's own repo has no usable copy: say why once, at WARNING (the recycler says what it builds)."""
    if hf_hub_id not in _told_fallback:
        _told_fallback.add(hf_hub_id)
        _logger.warning(f'No converted weights from {hf_hub_id} ({why}): recycling locally.')


def _hub_file(hf_hub_id: str, cache_dir: Optional[str], given: bool = False) -> Optional[str]:
    """The converted weights of ``hf_hub_id`` ('org/name[@revision]'): from the HF cache, else downloaded unless
    offline; a damaged cached copy is downloaded again. None when there is no usable file, for the tag's own repo;
    a repo the user ``given`` is their source: not getting it is an error naming the repo and the reason."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
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
    online = hub_reachable()  # asked only now that the cache has no usable copy

    def unavailable(why: str) -> None:
        if given:
            raise WeightsUnavailableError(
                f"Cannot get model.safetensors of the hf_hub_id '{hf_hub_id}' you gave ({why}): check the repo "
                f"name and revision, log in (`hf auth login` or HF_TOKEN) for a private or gated repo, or leave "
                f"hf_hub_id out for the tag's own weights.")
        _fallback(hf_hub_id, why)

    if damaged and not (given and not online):
        _logger.warning(f'The cached weights of {hf_hub_id} are damaged ({problem}); '
                        + ('downloading them again.' if online
                           else 'cannot download them again offline: recycling locally.'))
    if not online:  # a default repo not cached offline is the documented path: the recycler says what it builds
        if given:
            unavailable(f'cached copy damaged: {problem}' if damaged else not_cached_reason())
        return None
    try:
        path = hf_hub_download(repo_id, 'model.safetensors', cache_dir=cache_dir, revision=revision,
                               force_download=damaged)
    except Exception as e:  # not published, private, unreachable, a server error
        unavailable(_why(e))
        return None
    if given:
        refuse_damaged(path)
        return path
    problem = _damage(path)
    if problem is not None:
        _logger.warning(f'The weights downloaded from {hf_hub_id} are damaged ({problem}); recycling locally.')
        return None
    return path


def prepare_pretrained(variant: str, model_cls, model_args: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Return ``kwargs`` with ``pretrained_cfg_overlay`` pointing at a weights file for ``variant``.

    ``model_cls`` / ``model_args``: the entrypoint's model class and architecture; ``kwargs``: what the user
    passed to ``create_model`` on top of them.
    """
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=overlay)
    if cfg is None or cfg.file or cfg.state_dict is not None or cfg.source in ('hf-hub', 'local-dir') or cfg.url:
        path = _given_weights(cfg, kwargs.get('cache_dir')) if cfg is not None else None  # a. the user's source
        if path is None:
            return kwargs
        refuse_damaged(path)  # a file the library wrote carries a checksum: a damaged one is refused
        return dict(kwargs, pretrained_cfg_overlay=_with_input_contract(overlay, path))

    full = f'{cfg.architecture}.{cfg.tag}'
    changes = _architecture_kwargs(model_cls, cfg, model_args,
                                   {k: v for k, v in kwargs.items() if k not in _FACTORY_KWARGS})
    # an hf_hub_id other than the registered one is the user's source: used whatever the kwargs, never replaced
    # the registry's cfg of the tag: a pretrained_cfg the user passes as a dict is theirs, a str names a tag
    asked = kwargs.get('pretrained_cfg')
    registered = resolve_pretrained_cfg(variant, pretrained_cfg=asked if isinstance(asked, str) else None)
    given = bool(cfg.hf_hub_id) and cfg.hf_hub_id != getattr(registered, 'hf_hub_id', None)
    path = None
    hub_fits = set(changes) <= _RESAMPLED_ON_LOAD
    if given or (cfg.hf_hub_id and hub_fits and not os.environ.get('JETMOE_TIMM_PREDECESSOR')):
        path = _hub_file(cfg.hf_hub_id, kwargs.get('cache_dir'), given=given)  # b.
    if path is None:
        if _weight_builder is None:
            raise RuntimeError(f"No weights for '{full}' and no weight builder: import jetmoe_timm (it registers "
                               f"the recycler) before creating the model.")
        # c. recycle the architecture asked for, with the cfg's head so the file fits any num_classes
        path = str(_weight_builder(full, dict(model_args, **changes, num_classes=cfg.num_classes)))
    overlay.update(file=path, custom_load=False)
    return dict(kwargs, pretrained_cfg_overlay=_with_input_contract(overlay, path))


def recorded_input_contract(path: str) -> Dict[str, Any]:
    """The preprocessing a recycled safetensors file records for its weights (its predecessor's mean, std, ...,
    lists as tuples), {} where it records none or is no readable safetensors file (timm's own loading says so)."""
    try:
        contract = read_provenance(path).get('input_contract') or {}
    except Exception:
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in contract.items()}


def _with_input_contract(overlay: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``overlay`` plus the preprocessing recorded in a recycled file, so that timm's data config feeds the weights
    what they expect; what the user set in ``overlay`` wins."""
    return dict(recorded_input_contract(path), **overlay)


def build_jetmoe(model_cls, variant: str, pretrained: bool, model_args: Optional[Dict[str, Any]] = None, *,
                 pretrained_filter_fn: Callable, feature_cfg: Dict[str, Any], **kwargs) -> nn.Module:
    """A JetMoE model: ``model_args`` is the entrypoint's architecture, ``kwargs`` what the user asked for on top
    of it; ``pretrained_filter_fn`` and ``feature_cfg`` are the family's, for timm's builder. With ``pretrained``,
    the weights are chosen first (``prepare_pretrained``: a given source, the Hub copy or a recycled build), one
    message where none can be had.

    Then timm's ``build_model_with_cfg``, except that safetensors weights which fit the model as they are (same
    keys, shapes and dtypes: no new head, no other ``in_chans``) are memory-mapped into a model built on the
    meta device (``load_state_dict(assign=True)``): no random init to throw away and the weights held once, as
    the file's pages (copy-on-write: training writes its own copy of what it changes). Anything else, and
    ``features_only``, or a model built for another device goes through timm's own load, which adapts heads and
    input convs."""
    if pretrained:
        try:
            kwargs = prepare_pretrained(variant, model_cls, model_args or {}, kwargs)
        except WeightsUnavailableError as e:
            raise e.with_traceback(None) from None  # one message that says it all
    kwargs = dict(model_args or {}, **kwargs, pretrained_filter_fn=pretrained_filter_fn, feature_cfg=feature_cfg)
    on_cpu = torch.device(kwargs.get('device') or torch.get_default_device()).type == 'cpu'
    path = _mappable_weights(variant, kwargs) if pretrained and on_cpu and not kwargs.get('features_only') else None
    if path is not None:
        with torch.device('meta'):
            model = build_model_with_cfg(model_cls, variant, False, **kwargs)
        if _new_head(model):  # timm's own load drops the file's classifier and keeps a fresh init
            return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
        state = safetensors.torch.load_file(path)  # lazy: tensors over the file's mapped pages
        state = kwargs['pretrained_filter_fn'](state, model)
        own = model.state_dict()
        if own.keys() == state.keys() and all(
                (v.shape, v.dtype) == (state[k].shape, state[k].dtype) for k, v in own.items()):
            model.load_state_dict(state, assign=True)
            if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
                return model
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)


def _new_head(model: nn.Module) -> bool:
    """Whether timm's load would not take the file's classifier for ``model`` (built without weights, its
    ``pretrained_cfg`` the resolved one): the model's ``num_classes`` differs from the cfg's (train.py's
    ``--pretrained-path`` passes ``num_classes=-1`` to force a new head even when the shapes fit) or a
    ``label_offset`` cuts it. timm then initialises the head as for ``pretrained=False``: only its load does that."""
    cfg = model.pretrained_cfg
    if not cfg.get('classifier'):
        return False
    return getattr(model, 'num_classes', None) != cfg.get('num_classes') or bool(cfg.get('label_offset'))


def _mappable_weights(variant: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """The local safetensors file ``pretrained=True`` will load for ``variant`` with ``kwargs``: a resolved
    ``file`` (what ``prepare_pretrained`` hands timm, ``--pretrained-path``) or a ``local-dir:`` folder's; None for
    anything timm resolves itself (``hf-hub:`` with its own cache and revision rules)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    return _given_weights(cfg) if cfg is not None and cfg.file else None
