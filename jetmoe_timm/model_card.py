""" The model card of a converted JetMoE folder: a family's template (``model_cards/<family>.md``) filled with what
the folder says (its config.json, provenance and weights: parameters, MACs, MoE layers, retention), for the Hub.
"""
import os
import string
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn
from timm.models import get_pretrained_cfg

from ._names import did_you_mean
from .atomic import write_atomic
from .export import CARD_MARK, PROVENANCE_KEY, public_source, read_provenance
from .models import JetMoEMixin
from .profile import count_macs, count_params
from .recycle import RECYCLE_SOURCES
from .routing import moe_layers
from .version import __version__

__all__ = ['CARD_DIR', 'CARD_PLACEHOLDERS', 'render', 'template_of', 'write_card']

CARD_DIR = Path(__file__).resolve().parent / 'model_cards'  # package data; the source is the top-level model_cards/
# the ${name}s a card template may hold: what _card_context fills (docs/hub.md lists them)
CARD_PLACEHOLDERS = frozenset({
    'model_name', 'arch', 'display_name', 'tag', 'repo_id', 'version', 'license', 'datasets', 'dataset_line',
    'architecture', 'origin', 'notes', 'params_m', 'gmacs', 'img_size', 'num_classes', 'num_features',
    'classifier_note', 'create_kwargs', 'moe_layers', 'predecessor', 'provenance', 'model_args', 'load_by_name'})

_TAG_DATASETS = {'in1k': 'imagenet-1k', 'in21k': 'imagenet-21k', 'in22k': 'imagenet-22k'}


def _family(arch: str) -> str:
    """'v_jetmoe_tiny' (or 'v_jetmoe_base_patch14') -> 'v_jetmoe': the family whose card template serves every
    size."""
    return arch.partition('_jetmoe_')[0] + '_jetmoe'


def _display_name(arch: str) -> str:
    """The paper's name of a variant: 'v_jetmoe_tiny' -> 'V-JetMoE-T', 'c_jetmoe_femto' -> 'C-JetMoE-F'."""
    family, _, size = arch.partition('_jetmoe_')
    return f'{family.upper()}-JetMoE-{size[:1].upper()}'


def template_of(arch: str, template: Optional[os.PathLike]) -> Tuple[Path, str]:
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


def _card_context(name: str, config: Dict[str, Any], model: nn.Module, repo_id: str, folder: Path,
                  default_repo: Optional[str], fits_default: bool) -> Dict[str, str]:
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

    if repo_id == default_repo:  # by its full name: the bare arch loads the arch's default tag, maybe another
        by_name = (f"These are the default weights of `{name}`: `timm.create_model('{name}', pretrained=True)` "
                   f"downloads them as well.")
    elif fits_default:
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


def render(name: str, config: Dict[str, Any], model: nn.Module, repo_id: str, folder: Path,
           template: Optional[os.PathLike], *, default_repo: Optional[str], fits_default: bool) -> str:
    """The model card of the model ``name`` (``config`` and ``model``: what the folder's config.json describes) as
    published at ``repo_id``, from ``template`` or the family's own, figures computed from ``folder``;
    ``default_repo``: the tag's own Hub repo, ``fits_default``: whether the weights fit the tag's default
    architecture (how the card says to load them by name)."""
    _, text = template_of(name.partition('.')[0], template)
    try:  # the template's placeholders are checked: what fails here is the folder's config.json
        context = _card_context(name, config, model, repo_id, folder, default_repo, fits_default)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f'{folder}/config.json lacks what the model card is made from (its provenance under '
                         f'"jetmoe", pretrained_cfg, model_args; {type(e).__name__}: {e}): convert the model again, '
                         f'or repair config.json.') from None
    body = string.Template(text).substitute(context)  # every placeholder checked by template_of
    # the mark goes after the front matter: the Hub requires the YAML block to open the file
    head, sep, rest = body.partition('\n---\n')
    return f'{head}{sep}{CARD_MARK}\n{rest}' if body.startswith('---\n') and sep else f'{CARD_MARK}\n{body}'


def write_card(folder: Path, text: str) -> bool:
    """Write README.md atomically unless a hand-written card is there; True if written."""
    path = folder / 'README.md'
    if path.is_file() and CARD_MARK not in path.read_text():
        return False
    write_atomic(path, lambda tmp: tmp.write_text(text))  # a leftover would make the folder look like another thing
    return True
