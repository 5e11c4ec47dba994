""" Publish converted JetMoE weights to the Hugging Face Hub, with a model card, so that timm loads them back.

    jetmoe-timm push v_jetmoe_tiny [--out DIR] [convert options]     # recycle (jetmoe-timm convert), then publish
    jetmoe-timm push --from DIR [--repo-id ORG/NAME]                 # publish a folder that is already converted
    ... [--private] [--revision BRANCH] [--dry-run]

A published repo holds exactly ``model.safetensors``, timm's ``config.json`` (architecture, model_args,
pretrained_cfg, and the recycling provenance under ``"jetmoe"``) and a ``README.md`` model card rendered from
``model_cards/<family>.md`` with figures computed from the folder at push time. Afterwards, with
``import jetmoe_timm`` first, ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)`` loads it; when ORG/NAME is
the tag's default ``hf_hub_id`` (the default ``--repo-id``) so does ``timm.create_model('v_jetmoe_tiny',
pretrained=True)``.

Pushing checks the folder before anything leaves the machine: its weights must load strictly into the model its
``config.json`` describes, and, for the tag's default repo, into the default model too (or every
``pretrained=True`` user would get a shape error). Re-pushing identical files makes no commit: the Hub reports
each file's current oid before upload and huggingface_hub drops unchanged files.
"""
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import safetensors
import timm
import torch.nn as nn
from timm.models import get_pretrained_cfg

from . import model_card
from .export import PROVENANCE_KEY, read_model_config, verify_safetensors
from .hub_access import hub_offline_mode, hub_reachable
from .models import is_jetmoe_model, list_jetmoe_models
from .models._pretrained import architecture_signature, weight_shapes
from .recycle import RECYCLE_SOURCES
from .recycle.engine import RECYCLE_DEFAULTS

__all__ = ['UPLOAD_FILES', 'PushResult', 'check_push', 'push_to_hub', 'render_model_card']

_logger = logging.getLogger(__name__)

UPLOAD_FILES = ('model.safetensors', 'config.json', 'README.md')


@dataclass
class PushResult:
    repo_id: str
    revision: str
    folder: Path
    files: List[Tuple[str, int]]  # (name, bytes) of what was (or, in a dry run, would be) uploaded
    url: str
    commit: Optional[str] = None  # head of ``revision`` after the push; None in a dry run
    changed: bool = False  # False: the repo already had these exact files, no commit was made


# --- the folder ------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> Dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder: make one with `jetmoe-timm convert MODEL --out DIR`.')
    missing = [n for n in ('model.safetensors', 'config.json') if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f'{folder} lacks {", ".join(missing)}: push needs a folder written by `jetmoe-timm convert` or '
            f'jetmoe_timm.export.save_pretrained_folder.')
    fix = 'write the folder again with `jetmoe-timm convert` or jetmoe_timm.export.save_pretrained_folder.'
    config = read_model_config(folder, fix)
    if not isinstance(config.get('pretrained_cfg'), dict):
        raise ValueError(f'{folder / "config.json"} has no "pretrained_cfg": {fix}')
    return config


def _file_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    with safetensors.safe_open(str(path), framework='pt') as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _mismatch(model: nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> str:
    """Why ``shapes`` would not load strictly into ``model`` ('' if they would)."""
    expected = weight_shapes(model.state_dict())
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
    parts = [f'{name} {keys[:3]}{" ..." if len(keys) > 3 else ""}' for name, keys in
             (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)) if keys]
    return '; '.join(parts)


def _inspect_folder(folder: Path, model_name: Optional[str] = None) -> Tuple[str, Dict[str, Any], nn.Module]:
    """('arch.tag', config, the model config.json describes on the meta device) for a checked folder."""
    config = _read_config(folder)
    arch, tag = config['architecture'], config['pretrained_cfg'].get('tag')
    if not timm.is_model(arch):
        raise ValueError(f"{folder}/config.json names the architecture '{arch}', which timm does not know: "
                         f"jetmoe_timm registers {list_jetmoe_models()}.")
    name = f'{arch}.{tag}' if tag else arch
    if not is_jetmoe_model(arch):
        raise ValueError(f"{folder} holds a dense '{arch}', not a JetMoE model: convert it first (jetmoe-timm "
                         f"convert MODEL --predecessor {folder} --out DIR), then push DIR.")
    if model_name:
        want_arch, _, want_tag = model_name.partition('.')
        if want_arch != arch or (want_tag and want_tag != tag):
            raise ValueError(f"{folder} holds '{name}', not '{model_name}': pass the right MODEL or folder.")
    try:  # what leaves the machine is what was converted: complete, and matching its content checksum
        verify_safetensors(folder / 'model.safetensors', require_checksum=True)
    except (OSError, ValueError) as e:
        what = 'unverified' if 'no content checksum' in str(e) else 'damaged'  # timm's save_for_hf writes none
        raise ValueError(f'Not pushing {what} weights: {e}. Convert the model again (jetmoe-timm '
                         f'convert MODEL --out DIR) or re-export it with save_pretrained_folder.') from None
    try:  # built on the meta device: shapes and MACs without allocating (or initialising) the weights
        model = timm.create_model(f'local-dir:{folder}', device='meta')
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:  # model_args the architecture does not take
        raise ValueError(f"{folder}/config.json does not describe a buildable '{arch}' ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): fix its model_args, or re-export the folder "
                         f"with save_pretrained_folder.") from None
    problem = _mismatch(model, _file_shapes(folder / 'model.safetensors'))
    if problem:
        raise ValueError(f'{folder}/model.safetensors does not fit the model its config.json describes '
                         f'({problem}): re-export the folder with save_pretrained_folder.')
    return name, config, model


def _default_hub_id(name: str) -> Optional[str]:
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # a tag timm does not know has no default repo
        return None
    return cfg.hf_hub_id if cfg is not None else None


def default_repo_problem(name: str, provenance: Dict[str, Any]) -> Optional[str]:
    """Why weights of this ``provenance`` (predecessor, method, recipe) do not belong in the default repo of the
    recycled tag ``name``, which ``create_model(name, pretrained=True)`` downloads and whose cfg promises weights
    recycled from the tag's predecessor with the default method and recipe; None if they do, or if the tag is not
    built by recycling."""
    source = RECYCLE_SOURCES.get(name)
    if source is None:
        return None
    want = dict(predecessor=source['predecessor'], method=RECYCLE_DEFAULTS['method'], recipe=RECYCLE_DEFAULTS['recipe'])
    got = {k: provenance.get(k) for k in want}
    if got == want:
        return None
    return (f"the default repo of '{name}' holds weights recycled from {want['predecessor']} by {want['method']} "
            f"sampling ({want['recipe']} recipe), not {', '.join(f'{k}={v}' for k, v in got.items() if v != want[k])}: "
            f"push them to your own --repo-id ORG/NAME")


def _fits_default_model(name: str, model: nn.Module) -> bool:
    """Whether a checked folder's weights, which fit ``model`` (the architecture its config.json describes, from
    ``_inspect_folder``), are those of ``timm.create_model(name)`` itself (what ``pretrained=True`` builds): the same
    shapes, module types and attention heads."""
    return architecture_signature(model) == architecture_signature(timm.create_model(name, device='meta'))


def render_model_card(folder: os.PathLike, repo_id: str, template: Optional[os.PathLike] = None) -> str:
    """The README.md model card of ``folder`` as published at ``repo_id``, figures computed from the folder."""
    folder = Path(folder)
    name, config, model = _inspect_folder(folder)
    return _render_card(name, config, model, repo_id, folder, template)


def _render_card(name, config, model, repo_id: str, folder: Path, template) -> str:
    default_repo = _default_hub_id(name)
    fits = default_repo is not None and repo_id != default_repo and _fits_default_model(name, model)
    return model_card.render(name, config, model, repo_id, folder, template, default_repo=default_repo,
                             fits_default=fits)


# --- pushing ---------------------------------------------------------------------------------------------

def _is_network_error(e: BaseException) -> bool:
    # httpx(2) TransportError or requests' RequestException, depending on the huggingface_hub version
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__name__ in ('TransportError', 'RequestException') for c in type(e).__mro__)


# what git refuses in a branch name (git check-ref-format --branch), and so the Hub in --revision: a leading '-',
# '/' or '.', a trailing '/' or '.', '..', '//', '@{', a component starting with '.' or ending with '.lock', control
# characters, space and ~^:?*[\; also the name HEAD. '@' alone, which git takes, is refused too: it means HEAD in a
# revision, and 'hf-hub:ORG/NAME@@' would not read as a branch
_BAD_BRANCH = re.compile(r'^[-/.]|[/.]$|\.\.|//|@\{|/\.|\.lock(/|$)|[\x00-\x20\x7f~^:?*\[\\]')


def check_push(name: str, repo_id: Optional[str], *, revision: Optional[str] = None, dry_run: bool = False,
               token: Optional[str] = None, card_template: Optional[os.PathLike] = None,
               endpoint: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(repo id, token) for pushing the model ``name`` ('arch[.tag]'), or the one-line error a push would end
    with: no repo id, an invalid one, a branch name git refuses, no card template, and unless ``dry_run`` no token
    or ``HF_HUB_OFFLINE``. Cheap: ``jetmoe-timm push MODEL`` asks before converting, so a mistake never costs a
    conversion."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    repo_id = repo_id or _default_hub_id(name)
    if not repo_id:
        raise ValueError(f"'{name}' has no default Hub repo: pass --repo-id ORG/NAME.")
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f"--repo-id must look like ORG/NAME, got '{repo_id}'.")
    try:  # the Hub's own naming rules
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"--repo-id '{repo_id}' is not a valid Hub repo id ({e}): use letters, digits, '-', '_' "
                         f"and '.' in ORG/NAME, at most 96 characters.") from None
    if revision and (revision in ('@', 'HEAD') or _BAD_BRANCH.search(revision)):  # '' or None: main
        raise ValueError(f"--revision {revision!r} is not a valid branch name: no leading '-', '/' or "
                         f"'.', no trailing '/', '.' or '.lock', no '..', '//', '@{{', spaces or any of ~^:?*[\\, "
                         f"and not HEAD or @.")
    model_card.template_of(name.partition('.')[0], card_template)
    if not dry_run:
        token = token or get_token()
        if not token:
            raise RuntimeError('No Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write '
                               f"access to '{repo_id.split('/')[0]}' (or use --dry-run to only write the folder).")
        if hub_offline_mode():
            raise RuntimeError('HF_HUB_OFFLINE is set: unset it to push (or use --dry-run to only write the folder).')
        endpoint = (endpoint or constants.ENDPOINT).rstrip('/')
        if not endpoint.startswith(('http://', 'https://')):  # without it the probe would ask this machine
            raise ValueError(f"endpoint '{endpoint}' (--endpoint or HF_ENDPOINT) is no http(s) URL: give "
                             f"https://{endpoint.split('://')[-1]} (or http:// for a local server).")
        if not hub_reachable(endpoint=endpoint):  # a TCP probe: seconds, where a conversion takes minutes
            raise RuntimeError(f'Cannot reach the Hub at {endpoint} (nothing answers): check the network, or '
                               f'HF_ENDPOINT / --endpoint (or use --dry-run to only write the folder).')
    return repo_id, token


def push_to_hub(
        folder: os.PathLike,
        repo_id: Optional[str] = None,
        *,
        model_name: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        dry_run: bool = False,
        token: Optional[str] = None,
        endpoint: Optional[str] = None,
        commit_message: Optional[str] = None,
        card_template: Optional[os.PathLike] = None,
) -> PushResult:
    """Check ``folder``, (re)write its model card, and upload the three files to ``repo_id`` at ``revision``.

    ``repo_id`` defaults to the tag's ``hf_hub_id``. The token comes from ``token``, ``HF_TOKEN`` or
    ``hf auth login``; the endpoint from ``endpoint`` or ``HF_ENDPOINT``. A dry run writes the card and reports
    what would be uploaded without a token or any network access.
    """
    from huggingface_hub import constants
    folder = Path(folder)
    name, config, model = _inspect_folder(folder, model_name)
    default_id = _default_hub_id(name)
    # refused before the folder is touched
    repo_id, token = check_push(name, repo_id, revision=revision, dry_run=dry_run, token=token,
                                card_template=card_template, endpoint=endpoint)
    if repo_id == default_id and not _fits_default_model(name, model):
        raise ValueError(
            f"{repo_id} is the default repo of '{name}', but these weights are for other model arguments "
            f"({config.get('model_args')}): timm.create_model('{name.partition('.')[0]}', pretrained=True) would "
            f"fail to load them. Push them to your own --repo-id ORG/NAME.")
    problem = default_repo_problem(name, config.get(PROVENANCE_KEY) or {}) if repo_id == default_id else None
    if problem:
        raise ValueError(f'{repo_id}: {problem}.')
    endpoint = (endpoint or constants.ENDPOINT).rstrip('/')
    revision = revision or 'main'
    # the card's load calls name the branch the weights go to: 'hf-hub:ORG/NAME' alone loads main
    card_repo = repo_id if revision == 'main' else f'{repo_id}@{revision}'
    if not model_card.write_card(folder, _render_card(name, config, model, card_repo, folder, card_template)):
        _logger.warning(f'Keeping the hand-written {folder}/README.md (it lacks the generated-card mark).')
    files = [(n, (folder / n).stat().st_size) for n in UPLOAD_FILES]
    result = PushResult(repo_id, revision, folder, files, url=f'{endpoint}/{repo_id}')
    if dry_run:
        return result
    result.commit, result.changed = _upload(folder, repo_id, name, config, private, revision, token, endpoint,
                                            commit_message)
    return result


def _upload(folder, repo_id, name, config, private, revision, token, endpoint, commit_message) -> Tuple[str, bool]:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(endpoint=endpoint, token=token, library_name='jetmoe_timm')
    prov = config.get(PROVENANCE_KEY) or {}
    how = ', '.join(f'{k}={prov[k]}' for k in ('predecessor', 'method', 'recipe', 'source') if prov.get(k))
    message = commit_message or f'Upload {name}' + (f' ({how})' if how else '')
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != 'main':
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.repo_info(repo_id, revision=revision).sha
        # one commit with exactly these files; huggingface_hub leaves out those the repo already has
        ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(folder / n)) for n in UPLOAD_FILES]
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise RuntimeError(f'The Hub at {endpoint} rejected the token (401): log in again with `hf auth login` '
                               f'or fix HF_TOKEN.') from e
        if status == 403:
            raise RuntimeError(f"The token may not write to '{repo_id}' (403): use a token with write access to "
                               f"'{repo_id.split('/')[0]}', or another --repo-id.") from e
        raise RuntimeError(f'The Hub at {endpoint} refused the push to {repo_id}: {e}') from e
    except Exception as e:
        if _is_network_error(e):
            raise RuntimeError(f'Cannot reach the Hub at {endpoint} ({type(e).__name__}: {e}): check the network, '
                               f'or HF_ENDPOINT / --endpoint.') from e
        raise
    return info.oid, info.oid != before
