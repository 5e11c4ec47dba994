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
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import safetensors
import timm
import torch.nn as nn
from timm.models import get_pretrained_cfg

from ._names import did_you_mean
from .export import CARD_MARK, PROVENANCE_KEY, public_source, read_model_config, read_provenance, \
    verify_safetensors, write_atomic
from .hub_access import hub_offline_mode, hub_reachable
from .models import JetMoEMixin, is_jetmoe_model, list_jetmoe_models
from .models._pretrained import architecture_signature, weight_shapes
from .profile import count_macs, count_params
from .recycle import RECYCLE_SOURCES
from .recycle.engine import RECYCLE_DEFAULTS
from .routing import moe_layers
from .version import __version__

__all__ = ['UPLOAD_FILES', 'PushResult', 'check_push', 'push_to_hub', 'render_model_card']

_logger = logging.getLogger(__name__)

UPLOAD_FILES = ('model.safetensors', 'config.json', 'README.md')
CARD_DIR = Path(__file__).resolve().parent / 'model_cards'  # package data; the source is the top-level model_cards/
# the ${name}s a card template may hold: what _card_context fills (docs/hub.md lists them)
CARD_PLACEHOLDERS = frozenset({
    'model_name', 'arch', 'display_name', 'tag', 'repo_id', 'version', 'license', 'datasets', 'dataset_line',
    'architecture', 'origin', 'notes', 'params_m', 'gmacs', 'img_size', 'num_classes', 'num_features',
    'classifier_note', 'create_kwargs', 'moe_layers', 'predecessor', 'provenance', 'model_args', 'load_by_name'})

_TAG_DATASETS = {'in1k': 'imagenet-1k', 'in21k': 'imagenet-21k', 'in22k': 'imagenet-22k'}


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


def _fits_default_model(name: str, folder: Path) -> bool:
    """Whether the folder holds weights of ``timm.create_model(name)`` itself (what ``pretrained=True`` builds):
    the same shapes, module types and attention heads as the architecture its config.json describes."""
    default = timm.create_model(name, device='meta')
    if _mismatch(default, _file_shapes(folder / 'model.safetensors')):
        return False
    return architecture_signature(timm.create_model(f'local-dir:{folder}', device='meta')) == \
        architecture_signature(default)


# --- the model card --------------------------------------------------------------------------------------

def _family(arch: str) -> str:
    """'v_jetmoe_tiny' (or 'v_jetmoe_base_patch14') -> 'v_jetmoe': the family whose card template serves every
    size."""
    return arch.partition('_jetmoe_')[0] + '_jetmoe'


def _display_name(arch: str) -> str:
    """The paper's name of a variant: 'v_jetmoe_tiny' -> 'V-JetMoE-T', 'c_jetmoe_femto' -> 'C-JetMoE-F'."""
    family, _, size = arch.partition('_jetmoe_')
    return f'{family.upper()}-JetMoE-{size[:1].upper()}'


def _template(arch: str, template: Optional[os.PathLike]) -> Tuple[Path, str]:
    """The card template's path and text, checked (``_check_template``): ``template``, else model_cards/<arch>.md
    where a variant has its own, else its family's model_cards/<family>.md (v_jetmoe.md, c_jetmoe.md)."""
    own = CARD_DIR / f'{arch}.md'
    path = Path(template) if template else own if own.is_file() else CARD_DIR / f'{_family(arch)}.md'
    if not path.is_file():
        raise FileNotFoundError(f'No model card template at {path}: ' + (
            'pass an existing file to --card-template.' if template else
            f'add model_cards/{_family(arch)}.md (see the others) or pass --card-template FILE.'))
    try:
        text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
        raise ValueError(f'Model card template {path} is not UTF-8 text: pass a Markdown file to '
                         f'--card-template.') from None
    _check_template(path, text)
    return path, text


def _check_template(path: Path, text: str) -> None:
    """Every placeholder of the template ``text`` (at ``path``) one that a card fills, before a conversion
    (minutes) and not only when the card is rendered after it."""
    for m in string.Template.pattern.finditer(text):
        line = text.count('\n', 0, m.start()) + 1
        if m.group('invalid') is not None:
            raise ValueError(f"Model card template {path}, line {line}: a '$' that starts no placeholder: write "
                             f"${{name}} for a value or $$ for a dollar sign.")
        name = m.group('named') or m.group('braced')
        if name and name not in CARD_PLACEHOLDERS:
            raise ValueError(f"Model card template {path}, line {line}: unknown placeholder '{name}'"
                             f"{did_you_mean(name, sorted(CARD_PLACEHOLDERS))}: use one of "
                             f"{', '.join(sorted(CARD_PLACEHOLDERS))}.")


def _fmt(x: float) -> str:
    return f'{x:.4g}'


def _link(spec: Optional[str]) -> str:
    """Markdown for a predecessor spec: a Hub link for timm names and hf-hub: ids, code otherwise."""
    if not spec:
        return 'not recorded'
    if public_source(spec) != spec:  # a local folder or file: its name only, never a local path
        return public_source(spec)
    if spec.startswith('local checkpoint '):  # already recorded that way (public_source): no Hub link
        return spec
    if spec.startswith('hf-hub:'):
        return f'[{spec[7:]}](https://huggingface.co/{spec[7:]})'
    if ':' not in spec and '/' not in spec and '.' in spec:  # a timm 'arch.tag' name, hosted as timm/arch.tag
        return f'[{spec}](https://huggingface.co/timm/{spec})'
    return f'`{spec}`'


def _moe_layers_markdown(model: nn.Module) -> str:
    """One bullet per distinct SpheroMoE configuration: where the layers are and what experts they hold."""
    groups: Dict[tuple, List[str]] = {}
    for module_name, m in moe_layers(model).items():
        key = (m.num_core_experts, m.core_hidden, m.num_univ_experts, m.univ_hidden, m.slots_per_expert,
               m.routing, m.combine)
        groups.setdefault(key, []).append(module_name)
    if not groups:
        return '  - no SpheroMoE layers'
    lines = []
    for (ce, ch, ue, uh, slots, routing, combine), names in groups.items():
        where = f'`{names[0]}`' if len(names) == 1 else f'`{names[0]}` ... `{names[-1]}`'
        lines.append(f'  - {len(names)} x SpheroMoE ({where}): {ce} core experts (hidden {ch}) + {ue} universal '
                     f'experts (hidden {uh}), {slots} slot{"s" if slots > 1 else ""} per expert, `{routing}` '
                     f'routing, `{combine}` combine')
    return '\n'.join(lines)


def _retention_lines(prov: Dict[str, Any]):
    kept, contract = prov.get('retention'), prov.get('input_contract')
    if kept:
        yield (f"- **Retention at init:** linear CKA of its pooled features with the predecessor's "
               f"{_fmt(kept['cka'])} (the same architecture at random init: {_fmt(kept['cka_scratch'])}), on "
               f"{kept['images']} calibration images, before any fine-tuning")
    if contract and 'mean' in contract:
        yield (f"- **Preprocessing** (the predecessor's): mean {tuple(contract['mean'])}, std "
               f"{tuple(contract['std'])}" + (f", {contract['interpolation']} interpolation"
                                              if contract.get('interpolation') else ''))


def _provenance(prov: Dict[str, Any], has_selection: bool) -> str:
    if prov.get('source') == 'official':
        return (f"- **Converted from:** the official MoE Jetpack checkpoint `{prov.get('file')}` "
                f"(sha256 `{prov.get('sha256')}`), routing `{prov.get('routing')}`")
    if 'method' not in prov:
        return '- Not recorded: this folder was not written by the jetmoe_timm recycler.'
    lines = []
    if prov.get('body_predecessor'):
        lines.append(f"- **Body predecessor** (official recipe): {_link(prov['body_predecessor'])}")
    lines += [
        f"- **Recipe:** `{prov.get('recipe')}`; **neuron selection:** `{prov['method']}`; "
        f"**statistic:** `{prov.get('statistic')}`",
        f"- **Calibration:** `{prov.get('calibration')}`" + (
            f" ({prov['calibration_images']} images)" if prov.get('calibration_images') else '') +
        f"; **seed:** {prov.get('seed')}",
        *_retention_lines(prov),
        f"- **Tool:** jetmoe_timm {prov.get('jetmoe_timm_version', '')}".rstrip() + ' (`jetmoe-timm convert`)' + (
            '; the chosen channels, heads and neurons of every expert are in the `model.safetensors` metadata'
            if has_selection else ''),
    ]
    return '\n'.join(lines)


def _card_context(name: str, config: Dict[str, Any], model: nn.Module, repo_id: str, folder: Path) -> Dict[str, str]:
    arch, _, tag = name.partition('.')
    cfg, prov = config['pretrained_cfg'], config.get(PROVENANCE_KEY) or {}
    input_size = tuple(cfg.get('input_size', (3, 224, 224)))
    registered_pred = RECYCLE_SOURCES.get(name, {}).get('predecessor')
    predecessor = _link(prov.get('predecessor') or registered_pred)
    # the tag's datasets are those of the tag's own predecessor; another predecessor's are not known here
    own_predecessor = prov.get('predecessor', registered_pred) == registered_pred
    datasets = ([_TAG_DATASETS[t] for t in tag.split('_') if t in _TAG_DATASETS] or ['imagenet-1k']
                if own_predecessor else [])
    num_classes = int(config.get('num_classes', cfg.get('num_classes', 0)))
    # the tag's notes describe the registered weights: not a re-headed (fine-tuned) model, nor another recycling
    # recipe than the tag's (the provenance says what this folder is)
    registered = get_pretrained_cfg(name)
    keep_notes = registered is not None and registered.num_classes == num_classes and 'method' not in prov
    notes = (cfg.get('notes') or ()) if keep_notes else ()
    notes = [notes] if isinstance(notes, str) else list(notes)
    if prov.get('source') == 'official':
        origin = 'Its weights are the official MoE Jetpack release, converted to timm.'
    elif 'method' in prov:
        origin = (f"Its weights are *recycled* from a dense timm checkpoint, {predecessor}: a consistent subset of "
                  f"the predecessor's channels is kept in every layer, and every expert samples hidden neurons of "
                  f"the predecessor's MLPs.")
    else:
        origin = ''

    default_id = _default_hub_id(name)
    if repo_id == default_id:  # by its full name: the bare arch loads the arch's default tag, maybe another
        by_name = (f"These are the default weights of `{name}`: `timm.create_model('{name}', pretrained=True)` "
                   f"downloads them as well.")
    elif default_id is not None and _fits_default_model(name, folder):
        by_name = (f"By name: `timm.create_model('{name}', pretrained=True, "
                   f"pretrained_cfg_overlay=dict(hf_hub_id='{repo_id}'))`.")
    else:
        by_name = ('The architecture differs from the registered default, so load it by its `hf-hub:` name: '
                   '`config.json` carries the model arguments.')
    return dict(
        model_name=name, arch=arch, display_name=_display_name(arch), tag=tag, repo_id=repo_id, version=__version__,
        license=cfg.get('license', 'apache-2.0'),
        datasets='\n'.join(f'- {d}' for d in datasets),
        dataset_line=('none: a recycled initialisation, never fine-tuned (the predecessor was trained on '
                      + (', '.join(datasets) if datasets else 'what its own card says') + ')'
                      if tag.startswith('recycled') else ', '.join(datasets) or 'see the predecessor'),
        architecture=model.dense_layout() if isinstance(model, JetMoEMixin) else f'a {type(model).__name__}',
        origin=origin,
        notes=' '.join(notes),
        params_m=_fmt(count_params(model) / 1e6),
        gmacs=_fmt(count_macs(model, input_size) / 1e9),
        img_size=f'{input_size[1]} x {input_size[2]}',
        num_classes=str(num_classes),
        num_features=str(config.get('num_features', getattr(model, 'num_features', '?'))),
        classifier_note=(
            'This checkpoint has no classifier (`num_classes=0`): pass your own `num_classes` and fine-tune '
            'before using the logits.' if num_classes == 0 else
            f'The classifier ({num_classes} classes) is freshly initialised: fine-tune before using the logits.'
            if prov.get('classifier') == 'fresh' else
            f"The classifier predicts {num_classes} classes (the predecessor's, taken as it was)."
            if prov.get('classifier') == 'taken' else f'The classifier predicts {num_classes} classes.'),
        create_kwargs=', num_classes=100' if num_classes == 0 else '',
        moe_layers=_moe_layers_markdown(model),
        predecessor=predecessor,
        provenance=_provenance(prov, 'selection' in read_provenance(folder / 'model.safetensors')),
        model_args=', '.join(f'{k}={v!r}' for k, v in (config.get('model_args') or {}).items()) or 'the defaults',
        load_by_name=by_name,
    )


def render_model_card(folder: os.PathLike, repo_id: str, template: Optional[os.PathLike] = None) -> str:
    """The README.md model card of ``folder`` as published at ``repo_id``, figures computed from the folder."""
    folder = Path(folder)
    name, config, model = _inspect_folder(folder)
    return _render(name, config, model, repo_id, folder, template)


def _render(name, config, model, repo_id, folder, template) -> str:
    _, text = _template(name.partition('.')[0], template)
    try:  # the template's placeholders are checked: what fails here is the folder's config.json
        context = _card_context(name, config, model, repo_id, folder)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f'{folder}/config.json lacks what the model card is made from (its provenance under '
                         f'"jetmoe", pretrained_cfg, model_args; {type(e).__name__}: {e}): convert the model again, '
                         f'or repair config.json.') from None
    body = string.Template(text).substitute(context)  # every placeholder checked by _template
    # the mark goes after the front matter: the Hub requires the YAML block to open the file
    head, sep, rest = body.partition('\n---\n')
    return f'{head}{sep}{CARD_MARK}\n{rest}' if body.startswith('---\n') and sep else f'{CARD_MARK}\n{body}'


def _write_card(folder: Path, text: str) -> bool:
    """Write README.md atomically unless a hand-written card is there; True if written."""
    path = folder / 'README.md'
    if path.is_file() and CARD_MARK not in path.read_text():
        return False
    write_atomic(path, lambda tmp: tmp.write_text(text))  # a leftover would make the folder look like another thing
    return True


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
    _template(name.partition('.')[0], card_template)
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
    if repo_id == default_id and not _fits_default_model(name, folder):
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
    if not _write_card(folder, _render(name, config, model, card_repo, folder, card_template)):
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
