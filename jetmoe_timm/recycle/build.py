""" Building recycled weights for a registered model: its predecessor (``predecessor.py``), caching, locking.

``RECYCLE_SOURCES`` says, per pretrained tag, which dense timm checkpoint a tag is recycled from and how.
``build_recycled`` makes a successor model with recycled weights; ``cached_recycled_file`` does the same
once per machine: the weights go to ``$JETMOE_TIMM_CACHE`` (default ``~/.cache/jetmoe_timm``) as safetensors
with provenance metadata and a content checksum, written under a file lock and by atomic rename, so concurrent
processes (torchrun ranks) build once and nobody ever reads half a file. A cached file is used only after its
checksum and provenance check out; a damaged or foreign one is reported, removed and rebuilt. The lock is an OS
lock (flock), released when its holder dies, so a killed build never blocks later loads; its temporary file is
removed by the next build.

Environment:
    JETMOE_TIMM_CACHE         cache folder
    JETMOE_TIMM_PREDECESSOR   use this predecessor instead of the tag's (a timm name, hf-hub:..., local-dir:...,
                              or a bare checkpoint file of the tag's family, any head and size: its architecture is
                              read off the tensors)
    JETMOE_TIMM_CALIB         calibration source for builds: 'synthetic' (default), 'weights' or an image folder
    JETMOE_TIMM_CALIB_IMAGES  number of calibration images (default 256)
"""
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from filelock import FileLock, Timeout

from .._names import did_you_mean
from ..atomic import remove_dead_writers
from ..export import FOLDER_WEIGHT_SUFFIXES, PROVENANCE_KEY, is_local_spec, local_path, public_source, \
    save_safetensors_atomic, verify_safetensors
from ..models import check_model_name, is_jetmoe_model
from ..models._pretrained import recycled_note, register_weight_builder
from ..profile import count_params
from ..version import __version__
from .engine import (RECYCLE_DEFAULTS, RecycleResult, adapt_input_channels, check_options, check_recipe_family,
                     recycle, selection_to_json)
from .families import FAMILIES, family_of
from .predecessor import input_contract, load_predecessor

__all__ = ['RECYCLE_SOURCES', 'build_recycled', 'cache_dir', 'cached_recycled_file', 'predecessor_spec',
           'recycle_source']

_logger = logging.getLogger(__name__)

# pretrained tag -> how its weights are recycled (each family's ``recycled_from``, next to its cfgs)
RECYCLE_SOURCES: Dict[str, Dict[str, Any]] = {
    tag: dict(source) for spec in FAMILIES for tag, source in spec.recycled_from.items()}

# the options a cached build's key always records; calib and num_calib have defaults from the environment too
CACHE_KEY_OPTIONS = {k: RECYCLE_DEFAULTS[k] for k in ('method', 'recipe', 'statistic', 'seed', 'calib_size')}
_LOCK_NOTICE_S = 10.  # after this long waiting for another process's build, say so


def cache_dir() -> Path:
    return Path(os.environ.get('JETMOE_TIMM_CACHE') or Path.home() / '.cache' / 'jetmoe_timm')


def predecessor_spec(source: Dict[str, Any], given: Optional[str] = None) -> str:
    """The predecessor a build of ``source`` (a ``RECYCLE_SOURCES`` entry) uses: the one ``given``, else
    ``JETMOE_TIMM_PREDECESSOR``, else the tag's own."""
    return given or os.environ.get('JETMOE_TIMM_PREDECESSOR') or source['predecessor']


def body_predecessor_spec(source: Dict[str, Any], recipe: str, given: Optional[str] = None) -> Optional[str]:
    """The body predecessor a build of ``source`` with ``recipe`` uses (the official recipe's only): the one
    ``given``, else the tag's own, else None."""
    return (given or source.get('body_predecessor')) if recipe == 'official' else None


def recycle_source(model_name: str) -> Tuple[str, Dict[str, Any]]:
    """('arch.tag', its recycling source) for 'arch' (default tag) or 'arch.tag'."""
    arch, _, tag = model_name.partition('.')
    check_model_name(arch)
    full = f'{arch}.{tag}' if tag else next(
        (n for n in timm.models.get_arch_pretrained_cfgs(arch) if n in RECYCLE_SOURCES), None)
    if full in RECYCLE_SOURCES:
        return full, dict(RECYCLE_SOURCES[full])
    # only a name that fails gets its model built (on the meta device) to say why: not every load
    if not is_jetmoe_model(arch):
        raise ValueError(_dense_model_problem(model_name))
    if not tag:
        raise ValueError(f"'{arch}' has no recycled pretrained tag.")
    tags = [t.partition('.')[2] for t in timm.models.get_arch_pretrained_cfgs(arch)]
    if tag not in tags:
        raise ValueError(f"'{arch}' has no pretrained tag '{tag}'{did_you_mean(tag, tags)}: pick one of {tags}.")
    if tag == 'official_in1k':  # converted from the official release, not recycled
        raise ValueError(f"'{full}' holds the official MoE Jetpack weights, which are converted, not recycled: "
                         f"jetmoe-timm convert {arch} --from-official FILE --out DIR (FILE: the official checkpoint).")
    raise ValueError(f"'{full}' is not built by recycling; recycled tags: {sorted(RECYCLE_SOURCES)}.")


def _dense_model_problem(model_name: str) -> str:
    """A dense timm model named where a JetMoE model belongs: the JetMoE models recycled from its family, if any."""
    dense = type(timm.create_model(model_name.partition('.')[0], device='meta'))
    into = sorted({tag.partition('.')[0] for f in FAMILIES if issubclass(dense, f.predecessor_cls)
                   for tag in f.recycled_from})
    if not into:
        return f"'{model_name}' is a dense {dense.__name__}, which no JetMoE model is recycled from."
    return (f"'{model_name}' is a dense model: make a JetMoE model ({', '.join(into)}) from it with "
            f"predecessor='{model_name}' (jetmoe-timm convert MODEL --predecessor {model_name}).")


def _create_successor(model_name: str, model_kwargs: Dict[str, Any], seed: int) -> nn.Module:
    """The successor, with its non-recycled tensors (slot queries, ...) initialised from ``seed``."""
    arch = model_name.partition('.')[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, **model_kwargs)


def build_recycled(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        predecessor: Optional[str] = None,
        body_predecessor: Optional[str] = None,
        progress: bool = True,
        on_loaded: Optional[Callable[[], None]] = None,
        adapt_in_chans: bool = False,
        **options,
) -> Tuple[nn.Module, RecycleResult]:
    """Create ``model_name`` (+ ``model_kwargs``) and fill it with weights recycled from its predecessor.

    ``options`` go to ``jetmoe_timm.recycle.recycle`` (method, recipe, statistic, calib, num_calib, seed, ...);
    ``on_loaded`` is called once the predecessors are loaded, before the long part. ``adapt_in_chans`` (first
    load, where ``in_chans`` never reaches the build: timm adapts the weights to it on load): a predecessor with
    other input channels than the successor's has its stem adapted as timm adapts pretrained weights, instead of
    being refused.
    Returns the loaded successor and the recycling result (with selection and provenance).
    """
    full, source = recycle_source(model_name)
    opts = dict(CACHE_KEY_OPTIONS, **options)
    _check_options(opts)  # before the (slow) model loading
    if body_predecessor and opts['recipe'] != 'official':  # silently unused otherwise
        raise ValueError("body_predecessor (--body-predecessor) applies to recipe 'official' only: drop it, or pass "
                         "recipe='official' (--recipe official).")
    if opts['recipe'] == 'official':  # before any predecessor is loaded; the family comes from a meta-device build
        check_recipe_family(opts['recipe'], family_of(timm.create_model(full.partition('.')[0], device='meta')), full)
    pred_spec = predecessor_spec(source, predecessor)
    model_kwargs = dict(model_kwargs or {})
    pred = load_predecessor(pred_spec, arch_hint=source['predecessor'])  # first: fails fast when offline
    if adapt_in_chans:
        wanted = model_kwargs.get('in_chans', 3)
        chans = adapt_input_channels(pred, wanted)  # the channels it took, where adapted
        if chans is not None:  # the file stays at the tag's channels, as its cfg says
            # timm's rule repeats fewer channels (summed back on load) and keeps the first of more
            back = f'create the model with in_chans={chans} to get it back' if chans < wanted else \
                f'its weights for the channels beyond the first {wanted} are dropped, as timm drops them on load'
            _logger.warning(f'Predecessor {public_source(pred_spec)} takes {chans} input channels: its stem is adapted '
                            f"to the successor's {wanted} by timm's rule; {back}.")
    body = None
    body_spec = body_predecessor_spec(source, opts['recipe'], body_predecessor)
    if opts['recipe'] == 'official':
        if not body_spec:
            raise ValueError(f"recipe 'official' needs a body predecessor for {full}: pass --body-predecessor.")
        body = load_predecessor(body_spec, arch_hint=source.get('body_predecessor'), body=True)
    if on_loaded is not None:
        on_loaded()
    # built after the calibration pass, then filled in place: the successor is held once (see recycle)
    result = recycle(lambda: _create_successor(full, model_kwargs, opts['seed']), pred, body_predecessor=body,
                     progress=progress, **opts)
    succ = result.model
    contract = input_contract(pred)
    # the cfg describes these weights, not the registered default's: their predecessor, their recipe
    has_head = getattr(succ.get_classifier(), 'weight', None) is not None
    classifier = 'none' if not has_head else 'fresh' if f"{succ.pretrained_cfg['classifier']}.weight" in \
        result.fresh_keys else 'taken'
    notes = (recycled_note(public_source(pred_spec), opts['method'], opts['recipe'], classifier),)
    succ.pretrained_cfg = dict(succ.pretrained_cfg, notes=notes, **contract)
    # published with the weights (push): a local predecessor by its name only, never its path (the cache key,
    # not this record, tells one local file from another)
    result.provenance.update(
        input_contract=contract,
        model=full, predecessor=public_source(pred_spec), classifier=classifier,
        body_predecessor=public_source(body_spec), model_kwargs=model_kwargs)
    return succ, result


def _local_fingerprint(pred_spec: str) -> Optional[list]:
    """[name, size, mtime_ns] of a local predecessor file, or of a folder's config.json and weights files, read
    without reading their bytes; None for a timm name or an hf-hub: repo, and where the predecessor is gone."""
    if not is_local_spec(pred_spec):
        return None
    p = Path(local_path(pred_spec))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name == 'config.json' or f.name.endswith(FOLDER_WEIGHT_SUFFIXES))
    else:
        files = [p] if p.is_file() else []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()] or None


def _local_fingerprints(pred_spec: str, body_spec: Optional[str]) -> Dict[str, list]:
    """The provenance fields that tie a cached build to its local predecessors' files (``_local_fingerprint``):
    the predecessor's and the official recipe's body predecessor's, each where it is local and still there."""
    found = dict(predecessor_fingerprint=_local_fingerprint(pred_spec),
                 body_predecessor_fingerprint=_local_fingerprint(body_spec) if body_spec else None)
    return {k: v for k, v in found.items() if v is not None}


def _cache_key(full: str, model_kwargs: Dict[str, Any], pred_spec: str, options: Dict[str, Any]) -> str:
    if is_local_spec(pred_spec):  # one key per file or folder, whatever the working folder or spelling
        pred_spec = os.path.realpath(local_path(pred_spec))
    calib = options.get('calib')
    if isinstance(calib, (str, os.PathLike)) and calib not in ('synthetic', 'weights'):  # a folder: the same
        options = dict(options, calib=os.path.realpath(calib))  # 'calib' from two working folders is two folders
    body = options.get('body_predecessor')
    if body and is_local_spec(body):  # the official recipe's second predecessor, as the first
        options = dict(options, body_predecessor=os.path.realpath(local_path(body)))
    blob = json.dumps(dict(model=full, kwargs=model_kwargs, predecessor=pred_spec, options=options,
                           version=__version__), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_options(opts: Dict[str, Any]) -> None:
    check_options(**{k: opts[k] for k in RECYCLE_DEFAULTS if k in opts})


def _cache_problem(path: Path, key: str, fingerprints: Optional[Dict[str, list]] = None) -> Optional[str]:
    """Why the cached file ``path`` must not be used for build ``key``: None if it can, '' if there is none.

    ``fingerprints`` (``_local_fingerprints``) of the local predecessors that are still there: a build from other
    files at the same path is stale. A predecessor deleted since the build leaves the cached weights usable. Timm
    names and hf-hub: repos are keyed by name only: a repo updated on the Hub keeps its earlier build.
    """
    if not path.is_file():
        return ''
    try:
        meta = verify_safetensors(path, require_checksum=True)
        prov = json.loads(meta.get(PROVENANCE_KEY, '{}'))
    except (OSError, ValueError) as e:  # truncated, damaged header or data, unreadable
        return str(e)
    if prov.get('cache_key') != key:
        made = ', '.join(f'{k}={prov.get(k)}' for k in ('model', 'recipe', 'method', 'jetmoe_timm_version'))
        return f'{path} was built for another request ({made})'
    for field, fingerprint in (fingerprints or {}).items():
        which = field.rpartition('_fingerprint')[0].replace('_', ' ')
        if field not in prov:  # built by a version that did not record it
            return f'{path} records no fingerprint of its {which}'
        if prov[field] != fingerprint:
            return f'the {which} has changed since {path} was built from it'
    return None


def _lock(path: Path) -> FileLock:
    """The build lock of ``path``, acquired; tells the user when another process's build makes them wait."""
    lock = FileLock(str(path) + '.lock')
    try:
        lock.acquire(timeout=_LOCK_NOTICE_S)
    except Timeout:
        _logger.info(f'Waiting for another process that is building {path} (lock {lock.lock_file}).')
        lock.acquire()
    return lock


def _remove_leftovers(path: Path) -> None:
    """Delete what killed builds of ``path`` left (their writer folders, with the partial file in them); only call
    this holding its lock."""
    for old in remove_dead_writers(path):
        _logger.info(f'Removed {old}, left by an interrupted build.')


def _duration_hint(model_name: str, model_kwargs: Dict[str, Any], num_calib: int) -> str:
    """A rough duration: full-size v_jetmoe_tiny (265 M parameters, 256 calibration images at 224 px) took about
    45 s on 2 CPU cores, and 31 s with 16 images: about a third of it passes over images (statistics, retention),
    the rest loading, initialising and writing, which scale with the parameters."""
    model = timm.create_model(model_name.partition('.')[0], device='meta', **model_kwargs)
    params = count_params(model)
    side = model_kwargs.get('img_size', model.pretrained_cfg['input_size'][-1])
    side = side[-1] if isinstance(side, (tuple, list)) else side
    images = num_calib / 256 * (side / 224) ** 2
    seconds = max(5, round(45 * params / 265e6 * (0.65 + 0.35 * images)))
    return f'about {seconds} s on 2 CPU cores for {params / 1e6:.3g} M parameters'


def cached_recycled_file(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None, **options) -> Path:
    """Path of recycled weights for ``model_name``, building them (once, under a lock) if not cached."""
    full, source = recycle_source(model_name)
    model_kwargs = dict(model_kwargs or {})
    opts = dict(CACHE_KEY_OPTIONS, **options)
    calib = os.environ.get('JETMOE_TIMM_CALIB')
    if calib and 'calib' not in opts:
        opts['calib'] = calib
    if 'num_calib' not in opts and os.environ.get('JETMOE_TIMM_CALIB_IMAGES'):
        value = os.environ['JETMOE_TIMM_CALIB_IMAGES']
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"JETMOE_TIMM_CALIB_IMAGES='{value}' is not a positive number of images: "
                             f"set it to e.g. 256, or unset it.")
        opts['num_calib'] = int(value)
    _check_options(opts)  # bad requests fail here, before anything is created
    pred_spec = predecessor_spec(source)
    key = _cache_key(full, model_kwargs, pred_spec, opts)
    fingerprints = _local_fingerprints(pred_spec, body_predecessor_spec(source, opts['recipe'],
                                                                        opts.get('body_predecessor')))
    path = cache_dir() / full / f'{key}.safetensors'
    if _cache_problem(path, key, fingerprints) is None:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
    except PermissionError as e:  # a read-only cache answers hits only: one line, not filelock's traceback
        raise PermissionError(f'Cannot build {full} into the cache at {path.parent} ({e.strerror}): set '
                              f'JETMOE_TIMM_CACHE to a folder you can write to.') from None
    try:
        problem = _cache_problem(path, key, fingerprints)  # another process may have built it while we waited
        if problem is None:
            return path
        if problem:  # reported once, by the process that replaces it
            _logger.warning(f'Not using cached weights: {problem}. Rebuilding them.')
            path.unlink(missing_ok=True)
        _remove_leftovers(path)
        hint = _duration_hint(full, model_kwargs, opts.get('num_calib', RECYCLE_DEFAULTS['num_calib']))
        announce = functools.partial(  # once the predecessor is loaded: offline, the error comes alone
            _logger.warning, f'Recycling {full} from {pred_spec} (first load; {hint}; then cached at {path}).')
        model, result = build_recycled(full, model_kwargs, predecessor=pred_spec, on_loaded=announce,
                                       adapt_in_chans=True, **opts)
        provenance = dict(result.provenance, cache_key=key, selection=selection_to_json(result.selection),
                          **fingerprints)
        save_safetensors_atomic(model.state_dict(), path, provenance)
        kept = provenance.get('retention')
        if kept:
            _logger.info(f"Recycled {full}: linear CKA with the predecessor's features {kept['cka']:.3f} (random "
                         f"init {kept['cka_scratch']:.3f}).")
    finally:
        lock.release()
    return path


def _weights_for_tag(model_name: str, model_kwargs: Dict[str, Any]) -> Path:
    """Build-on-first-load (``models._pretrained``): the recycled weights of a tag that has no file anywhere."""
    if model_name not in RECYCLE_SOURCES:
        raise RuntimeError(
            f"No weights for '{model_name}': they are not in the cache and cannot be downloaded, and this tag is "
            f"not built by recycling. Connect once, or pass pretrained_cfg_overlay=dict(file=...) (train.py: "
            f"--pretrained-path) with a local copy.")
    return cached_recycled_file(model_name, model_kwargs)


register_weight_builder(_weights_for_tag)
