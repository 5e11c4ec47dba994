""" Official MoE Jetpack checkpoints (MMPretrain ``vit_tiny_moe_custom``) in jetmoe_timm's V-JetMoE models.

The official model is a timm ViT, so every dense key already has timm's name; only the SpheroMoE layers
(``DualPathSoftMoELayerWrapper``) differ. Per MoE block ``blocks.i.mlp.``:

    official                                       jetmoe_timm
    phi                        (E, S, d)           slot_query                 (E, S, d)
    scales.0, scales.1         ()  temperature t   temp_raw                   (2,)  t = t_min + softplus(raw)
    slot_norm.{weight,bias}    (d,)                slot_norm.{weight,bias}
    {core,univ}_experts.vit_fc{1,2}.weight (E, out, in)   {core,univ}_experts.fc{1,2}.weight (E, in, out)
    {core,univ}_experts.vit_fc{1,2}.bias   (E, out)       {core,univ}_experts.fc{1,2}.bias   (E, out)

Checkpoints may come wrapped (``{'state_dict': ...}``, ``{'model': ...}``) and with ``module.``, ``_orig_mod.``,
``model.`` or ``backbone.`` key prefixes; both are removed. The official model pools with ``global_pool='avg'``,
so its final norm is ``fc_norm`` (``norm`` is an Identity), as in ``v_jetmoe_tiny``.

The official layer's equations are jetmoe_timm's ``routing='official'`` preset (entmax15 combine). The official
code also adds logit noise at inference; that is off here unless ``moe_noise_at_eval=True``.

Loading paths (all convert automatically):
  * ``timm.create_model('v_jetmoe_tiny.official_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=P))``
  * ``timm.models.load_checkpoint(model, P)`` or ``model.load_state_dict(sd)`` on a model from ``create_model``
  * ``convert_official_checkpoint(P, OUT)``, then ``timm.create_model('local-dir:OUT', pretrained=True)``
"""
import hashlib
import logging
import math
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import safetensors.torch
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ._names import quoted
from .export import is_torch_checkpoint, save_pretrained_folder
from .layers import SpheroMoE

__all__ = ['is_official_state_dict', 'official_to_timm', 'timm_to_official', 'convert_official_checkpoint',
           'convert_official_pre_hook']

_logger = logging.getLogger(__name__)

# the official pipeline's preprocessing (MMPretrain's ImageNet eval): the official_in1k tag's and a converted file's
OFFICIAL_DATA_CFG = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=0.875)

# wrappers the official training code (mmengine / MMPretrain / DDP / torch.compile) puts around the timm keys
_KEY_PREFIXES = ('module.', '_orig_mod.', 'model.', 'backbone.')
_CONTAINER_KEYS = ('state_dict', 'model', 'module')
# one MoE parameter: block index, then the official name inside the layer
_OFFICIAL_MOE_KEY = re.compile(r'^blocks\.(\d+)\.mlp\.(phi|scales\.[01]|slot_norm\..+|(?:core|univ)_experts\..+)$')
_EXPERT_GROUPS = ('core_experts', 'univ_experts')


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True if the keys follow the official MoE Jetpack layout (prefixed or not)."""
    return any('.vit_fc1.' in k or k.endswith('.mlp.phi') for k in state_dict)


def _unwrap(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint, without container dicts or wrapper key prefixes."""
    while True:
        inner = next((checkpoint[k] for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            break
        checkpoint = inner
    out = {}
    for k, v in checkpoint.items():
        while k.startswith(_KEY_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def _moe_layers(model: nn.Module) -> Dict[int, SpheroMoE]:
    """{block index: SpheroMoE layer} of a V-JetMoE model."""
    blocks = getattr(model, 'blocks', None)
    if blocks is None:
        raise ValueError(
            f'Official MoE Jetpack checkpoints are V-JetMoE (ViT) checkpoints; {type(model).__name__} has no '
            f'`blocks`. Build the model with timm.create_model("v_jetmoe_tiny", ...).')
    return {i: b.mlp for i, b in enumerate(blocks) if isinstance(b.mlp, SpheroMoE)}


def _official_layout(state_dict: Mapping[str, torch.Tensor]) -> Dict[int, Dict[str, int]]:
    """Per official MoE block: expert counts, slots and hidden widths, read from the tensor shapes."""
    layout = {}
    for k, v in state_dict.items():
        m = _OFFICIAL_MOE_KEY.match(k)
        if m is None or m[2] != 'phi':
            continue
        i = int(m[1])
        p = f'blocks.{i}.mlp.'
        core = state_dict.get(p + 'core_experts.vit_fc1.weight')
        univ = state_dict.get(p + 'univ_experts.vit_fc1.weight')
        layout[i] = dict(
            num_core_experts=core.shape[0] if core is not None else 0,
            num_univ_experts=univ.shape[0] if univ is not None else 0,
            slots_per_expert=v.shape[1],
            core_hidden=core.shape[1] if core is not None else 4 * v.shape[-1],
            univ_hidden=univ.shape[1] if univ is not None else 0,
        )
    return dict(sorted(layout.items()))


def _layer_layout(layer: SpheroMoE) -> Dict[str, int]:
    return dict(
        num_core_experts=layer.num_core_experts,
        num_univ_experts=layer.num_univ_experts,
        slots_per_expert=layer.slots_per_expert,
        core_hidden=layer.core_hidden,
        univ_hidden=layer.univ_hidden if layer.num_univ_experts else 0,
    )


def _layout_kwargs(layout: Dict[str, int]) -> Dict[str, Any]:
    """V-JetMoE constructor kwargs for one block's layout."""
    kwargs = {k: layout[k] for k in ('num_core_experts', 'num_univ_experts', 'slots_per_expert', 'core_hidden')}
    if layout['num_univ_experts']:
        kwargs['univ_ratio'] = layout['univ_hidden'] / layout['core_hidden']
    return kwargs


def _check_compatible(state_dict: Mapping[str, torch.Tensor], model: nn.Module, layers: Dict[int, SpheroMoE]):
    """Raise a ValueError naming the model kwargs to change when the checkpoint cannot fit the model."""
    unsupported = next(
        (k for k in state_dict if '.mlp.experts.' in k or k.startswith(('moe_layers_dict.', 'phi_dict.'))), None)
    if unsupported is not None:
        raise ValueError(
            f"Unsupported official variant (key '{unsupported}'): only the dual-path layer (core_experts / "
            f"univ_experts, one layer per block) maps onto SpheroMoE; the single-path SoftMoELayerWrapper and "
            f"cross-block shared layers (moe_groups_dict) route differently.")
    width = state_dict.get('cls_token', state_dict.get('pos_embed'))
    if width is not None and width.shape[-1] != model.embed_dim:
        raise ValueError(
            f'The checkpoint has width {width.shape[-1]} but the model has embed_dim={model.embed_dim}: pick the '
            f'architecture of that width (v_jetmoe_tiny: 192, v_jetmoe_small: 384) or set embed_dim, depth and '
            f'num_heads.')
    layout = _official_layout(state_dict)
    if sorted(layout) != sorted(layers):
        raise ValueError(
            f'The checkpoint has MoE layers in blocks {sorted(layout)} but the model in {sorted(layers)}: build '
            f'the model with moe_blocks={sorted(layout)}.')
    for i, found in layout.items():
        have = _layer_layout(layers[i])
        if found != have:
            fix = ', '.join(f'{k}={v!r}' for k, v in _layout_kwargs(found).items())
            raise ValueError(
                f'Block {i}: the checkpoint has a MoE layer with {found} but the model has {have}: build the model '
                f'with {fix}.')
        if layers[i].temp_raw.numel() != 2:
            raise ValueError(
                f"Block {i}: official layers have two temperatures (dispatch, combine), the model's "
                f"routing='{layers[i].routing}' has one: build the model with routing='official'.")
    for name, other in (('fc_norm', 'norm'), ('norm', 'fc_norm')):
        if f'{name}.weight' in state_dict and isinstance(getattr(model, name, None), nn.Identity):
            pool = 'avg' if name == 'fc_norm' else 'token'
            raise ValueError(
                f"The checkpoint has a final '{name}' (the official model's global_pool='{pool}') but the model "
                f"uses '{other}': build it with global_pool='{pool}'.")


def _temperature_to_raw(scale: torch.Tensor, layer: SpheroMoE, key: str) -> float:
    t = float(scale)
    try:
        return layer.temperature_to_raw(t)
    except ValueError:
        raise ValueError(
            f'{key} = {t:g}: jetmoe_timm keeps temperatures above temperature_min={layer.temperature_min:g} '
            f'(t = temperature_min + softplus(temp_raw)), so this official temperature cannot be represented. '
            f'If it is positive, lower the floor of every SpheroMoE layer before loading (e.g. '
            f'`layer.temperature_min = {t / 2:g}`).') from None


def official_to_timm(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official MoE Jetpack state dict onto ``model``'s keys (see the module docstring).

    ``model`` gives the MoE blocks and each layer's temperature floor; it is checked against the checkpoint,
    and a mismatch raises a ValueError that names the model kwargs to use.
    """
    state_dict = _unwrap(state_dict)
    layers = _moe_layers(model)
    _check_compatible(state_dict, model, layers)
    if any(layer.combine != 'entmax15' for layer in layers.values()):
        _logger.warning(
            "Loading official MoE Jetpack weights into SpheroMoE layers with a softmax combine: outputs will "
            "differ from the official model, which combines with entmax15. Build with routing='official' (or "
            "use the 'v_jetmoe_tiny.official_in1k' tag) unless you mean to fine-tune with softmax.")

    out = {}
    scales: Dict[int, Dict[int, torch.Tensor]] = {}
    for k, v in state_dict.items():
        m = _OFFICIAL_MOE_KEY.match(k)
        if m is None:
            out[k] = v  # dense keys are timm's own
            continue
        i, name = int(m[1]), m[2]
        p = f'blocks.{i}.mlp.'
        if name == 'phi':
            out[p + 'slot_query'] = v
        elif name.startswith('scales.'):
            scales.setdefault(i, {})[int(name[-1])] = v
        elif '.vit_fc' in name:
            if name.endswith('.weight'):
                v = v.transpose(1, 2).contiguous()  # (E, out, in) -> (E, in, out)
            out[p + name.replace('.vit_fc', '.fc')] = v
        else:
            out[k] = v  # slot_norm, and anything unknown: let the strict load report it
    for i, found in sorted(scales.items()):
        if sorted(found) != [0, 1] or i not in layers:  # malformed: left for the strict load to report
            out.update({f'blocks.{i}.mlp.scales.{j}': v for j, v in found.items()})
            continue
        raw = [_temperature_to_raw(found[j], layers[i], f'blocks.{i}.mlp.scales.{j}') for j in (0, 1)]
        dtype = found[0].dtype if found[0].is_floating_point() else torch.float32
        out[f'blocks.{i}.mlp.temp_raw'] = torch.tensor(raw, dtype=dtype)
    return out


def timm_to_official(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The inverse of ``official_to_timm``: jetmoe_timm keys -> official MoE Jetpack keys (no prefix).

    Exact for every tensor but the temperatures, which go through softplus and back (float32 rounding).
    """
    layers = _moe_layers(model)
    out = {}
    for k, v in state_dict.items():
        m = re.match(r'^blocks\.(\d+)\.mlp\.(.+)$', k)
        if m is None or int(m[1]) not in layers:
            out[k] = v
            continue
        i, name = int(m[1]), m[2]
        p = f'blocks.{i}.mlp.'
        layer = layers[i]
        if name == 'slot_query':
            out[p + 'phi'] = v
        elif name == 'temp_raw':
            if v.numel() != 2:
                raise ValueError(
                    f"Block {i} has routing='{layer.routing}' with one temperature; the official layer needs two "
                    f"(routing='official' or 'sphero').")
            t = layer.temperature_min + F.softplus(v.detach().double())
            for j in (0, 1):
                out[f'{p}scales.{j}'] = t[j].to(v.dtype)  # 0-d, as the official nn.Parameter(torch.tensor(0.5))
        elif name.split('.')[0] in _EXPERT_GROUPS:
            group, fc, kind = name.split('.')
            if kind == 'weight':
                v = v.transpose(1, 2).contiguous()  # (E, in, out) -> (E, out, in)
            out[f'{p}{group}.vit_{fc}.{kind}'] = v
        else:
            out[k] = v  # slot_norm
    return out


def convert_official_pre_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: convert official keys under ``prefix`` in place, so that
    ``model.load_state_dict(official)`` and ``timm.models.load_checkpoint(model, official_file)`` just work."""
    own = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
    if not is_official_state_dict(own):
        return
    converted = official_to_timm({name: state_dict.pop(key) for name, key in own.items()}, module)
    state_dict.update({prefix + k: v for k, v in converted.items()})


def _read_checkpoint(path: Path, weights_only: bool) -> Dict[str, torch.Tensor]:
    if path.is_dir():
        raise IsADirectoryError(f'{path} is a folder: pass the official checkpoint file itself (.pth / .safetensors).')
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}: pass the official checkpoint file (.pth / .safetensors).')
    if path.suffix == '.safetensors':
        try:
            return _unwrap(safetensors.torch.load_file(str(path)))
        except Exception as e:  # SafetensorError: truncated or not safetensors at all
            raise ValueError(f'{path} cannot be read as safetensors ({quoted(e)}): pass an '
                             f'intact official checkpoint.') from None
    if not is_torch_checkpoint(path):
        raise ValueError(f'{path} is no PyTorch checkpoint (neither a zip archive nor a pickle): pass the official '
                         f'.pth file.')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=weights_only)
    except RuntimeError as e:  # a truncated or damaged zip archive (torch's long miniz message)
        raise ValueError(f'{path} is a damaged PyTorch checkpoint ({str(e).split(".")[0][:120]}): download it '
                         f'again.') from None
    except pickle.UnpicklingError as e:
        if not weights_only:
            raise
        raise RuntimeError(
            f'{path} holds more than tensors (e.g. mmengine training state), which torch.load(weights_only=True) '
            f'refuses. If you trust the file, convert it in Python with convert_official_checkpoint(path, out, '
            f'weights_only=False), which needs the packages that pickled it (e.g. mmengine); or keep only its '
            f'weights where the official code runs: '
            f"torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pth').") from e
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a state dict.')
    return _unwrap(checkpoint)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            h.update(chunk)
    return h.hexdigest()


def _official_model_kwargs(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """create_model kwargs that reproduce the checkpoint's layout: MoE blocks and experts, head, pooling, size."""
    layout = _official_layout(state_dict)
    kwargs: Dict[str, Any] = dict(moe_blocks=list(layout))
    if layout:
        first = next(iter(layout.values()))
        if any(v != first for v in layout.values()):
            raise ValueError(f'The MoE layers differ between blocks ({layout}); V-JetMoE models need one layout.')
        kwargs.update(_layout_kwargs(first))
    head = state_dict.get('head.weight')
    kwargs['num_classes'] = head.shape[0] if head is not None else 0
    if 'norm.weight' in state_dict and 'fc_norm.weight' not in state_dict:
        kwargs['global_pool'] = 'token'
    pos_embed, patch = state_dict.get('pos_embed'), state_dict.get('patch_embed.proj.weight')
    if pos_embed is not None and patch is not None:
        grid = math.isqrt(pos_embed.shape[1] - 1)  # one CLS token
        if grid * grid == pos_embed.shape[1] - 1:
            kwargs['img_size'] = grid * patch.shape[-1]
    return kwargs


def convert_official_checkpoint(
        path: Union[str, Path],
        out_dir: Union[str, Path],
        model_name: str = 'v_jetmoe_tiny',
        overwrite: bool = False,
        weights_only: bool = True,
        **model_kwargs,
) -> Path:
    """Convert an official MoE Jetpack checkpoint (.pt / .pth, or its state dict as .safetensors) into a timm folder
    (model.safetensors + config.json).

    The MoE layout (blocks, expert counts, widths), classes and image size are read from the file and
    ``routing='official'`` is set; ``model_kwargs`` add options (a value other than the file's for what is read
    from it is refused: load the folder with it instead). ``model_name`` without a tag gets its
    ``.official_in1k`` tag when there is one (ImageNet mean/std, crop 0.875, as the official pipeline).
    Load the result with ``timm.create_model('local-dir:OUT', pretrained=True)`` after ``import jetmoe_timm``.

    Args:
        path: the official checkpoint (an mmengine checkpoint or a plain state dict).
        out_dir: folder to write; must not exist unless ``overwrite``.
        model_name: timm architecture of the checkpoint's width.
        overwrite: replace an existing ``out_dir``.
        weights_only: refuse pickled objects other than tensors (safe); False only for files you trust.
        **model_kwargs: extra ``timm.create_model`` kwargs (e.g. ``moe_noise_at_eval=True``).
    """

    from .models import VisionTransformerJetMoE  # here: the model module imports this one
    arch = model_name.partition('.')[0]
    if not isinstance(timm.create_model(arch, device='meta'), VisionTransformerJetMoE):  # before reading the file
        raise ValueError(f"official MoE Jetpack checkpoints are V-JetMoE (ViT) models, and '{arch}' is not one: pass "
                         f"a v_jetmoe_* model of the checkpoint's width.")
    path = Path(path)
    state_dict = _read_checkpoint(path, weights_only)
    if not is_official_state_dict(state_dict):
        raise ValueError(
            f'{path} is not an official MoE Jetpack checkpoint (no blocks.*.mlp.phi / *_experts.vit_fc1 keys). '
            f'A timm-layout file loads as is: timm.create_model(..., pretrained=True, '
            f'pretrained_cfg_overlay=dict(file=...)).')
    kwargs = dict(_official_model_kwargs(state_dict), routing='official')
    read = {k: v for k, v in model_kwargs.items() if k in kwargs and kwargs[k] != v}
    if read:  # what the file's tensors are: another value cannot take them
        raise ValueError(
            f"{', '.join(f'{k}={v!r}' for k, v in read.items())}: the checkpoint has "
            f"{', '.join(f'{k}={kwargs[k]!r}' for k in read)}; convert it as it is, then load the folder with "
            f"timm.create_model('local-dir:OUT', pretrained=True, {', '.join(f'{k}=...' for k in read)}) (timm "
            f"adapts the head and the position grid on load).")
    kwargs.update(model_kwargs)
    if '.' not in model_name and f'{model_name}.official_in1k' in timm.list_pretrained(f'{model_name}.*'):
        model_name = f'{model_name}.official_in1k'
    overlay = dict(OFFICIAL_DATA_CFG)

    # built on the meta device and filled by assignment: no 1 GB random init that is overwritten at once
    model = timm.create_model(model_name, pretrained_cfg_overlay=overlay, device='meta', **kwargs)
    model.load_state_dict(official_to_timm(state_dict, model), strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f'Tensors not filled by the checkpoint: {left}.')
    provenance = dict(
        source='official',
        file=path.name,
        sha256=_sha256(path),
        model_name=model_name,
        routing=kwargs['routing'],
    )
    out = save_pretrained_folder(model.eval(), out_dir, provenance, overwrite=overwrite)
    _logger.info(f'Converted {path} -> {out} ({model_name}).')
    return out
