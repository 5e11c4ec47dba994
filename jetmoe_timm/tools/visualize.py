""" Look inside a JetMoE model: where its experts look, and what each path and expert contributes.

    from jetmoe_timm.tools.visualize import inspect_routing, save_inspection
    result = inspect_routing(model, ['cat.jpg', 'dog.jpg'])    # image paths, PIL images or a (B, 3, H, W) batch
    result.layers['blocks.6.mlp'].expert_share                  # (B, E) numpy arrays, ready for a notebook
    save_inspection(result, 'inspect/')                         # PNG figures + routing.json

or from the shell: ``jetmoe-timm inspect v_jetmoe_tiny cat.jpg dog.jpg --checkpoint model.safetensors``.
The figures are explained in docs/inspect.md.

Tokens are laid out on the image grid: for a ViT the prefix (CLS / register) tokens are set aside and the patch
tokens reshaped to the patch grid; a channels-last ConvNeXt map has no prefix, its tokens are its H * W positions.
Experts are numbered globally, core experts first: expert e owns slots e * S .. e * S + S - 1.
"""
import argparse
import json
import math
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._modes import eval_mode
from .._names import quoted
from ..atomic import write_atomic
from ..export import FOLDER_WEIGHT_SUFFIXES, is_torch_checkpoint, read_model_config
from ..models import is_jetmoe_model, list_jetmoe_models
from ..models._pretrained import WeightsUnavailableError
from ..recycle.calibration import fit_channels, image_mode, image_tensor, in_mode, model_data_config
from ..routing import moe_layers, routing_info
from .checks import check_device, check_model_kwargs, check_model_name, check_output_folder, parse_model_kwargs

if TYPE_CHECKING:  # PIL is imported where images are read: the annotations only name it
    import PIL.Image

__all__ = [
    'LayerRouting', 'RoutingInspection', 'inspect_routing', 'plot_dispatch_maps', 'plot_contributions',
    'save_inspection', 'add_parser',
]

ImageInput = Union[torch.Tensor, Sequence[Union[str, os.PathLike, 'PIL.Image.Image']]]

_PATH_COLORS = {'core': 'C0', 'univ': 'C1'}


def _rms(a: np.ndarray) -> np.ndarray:
    """(B, N, d) -> (B,): root mean square over tokens of the token L2 norms."""
    return np.sqrt((a.astype(np.float64) ** 2).sum(-1).mean(-1))


@dataclass
class LayerRouting:
    """What one SpheroMoE layer did on a batch (arrays from ``routing_info``, as numpy).

    B images, N tokens (prefix first), M = E * S slots, E = E_core + E_univ experts (core first), d channels.
    """
    name: str
    grid: Tuple[int, int]  # (gh, gw): the N - num_prefix_tokens image tokens, row-major
    num_prefix_tokens: int
    num_core_experts: int
    num_univ_experts: int
    slots_per_expert: int
    dispatch: np.ndarray  # (B, N, M), sums to 1 over N
    combine: np.ndarray  # (B, N, M), sums to 1 over M
    core_out: np.ndarray  # (B, N, d)
    univ_out: np.ndarray  # (B, N, d); core_out + univ_out = layer output
    slot_contrib: np.ndarray  # (B, M): || sum_n combine[b, n, m] * y[b, m] ||

    @property
    def num_experts(self) -> int:
        return self.num_core_experts + self.num_univ_experts

    def _per_expert(self, a: np.ndarray) -> np.ndarray:
        # (..., M) -> (..., E, S)
        return a.reshape(*a.shape[:-1], self.num_experts, self.slots_per_expert)

    @property
    def expert_dispatch(self) -> np.ndarray:
        """(B, E, gh, gw) dispatch weights of the image tokens, averaged over each expert's slots."""
        B = self.dispatch.shape[0]
        d = self._per_expert(self.dispatch[:, self.num_prefix_tokens:]).mean(-1)  # (B, gh * gw, E)
        return d.transpose(0, 2, 1).reshape(B, self.num_experts, *self.grid)

    @property
    def prefix_dispatch(self) -> np.ndarray:
        """(B, E) dispatch mass on the prefix tokens: ``expert_dispatch`` sums to 1 minus this."""
        return self._per_expert(self.dispatch[:, :self.num_prefix_tokens].sum(1)).mean(-1)

    @property
    def expert_contrib(self) -> np.ndarray:
        """(B, E) norm of what each expert adds to the layer output, summed over its slots."""
        return self._per_expert(self.slot_contrib).sum(-1)

    @property
    def expert_share(self) -> np.ndarray:
        """(B, E) ``expert_contrib`` as a fraction of all experts' (each row sums to 1)."""
        c = self.expert_contrib
        return c / c.sum(-1, keepdims=True)

    @property
    def path_norms(self) -> Dict[str, np.ndarray]:
        """RMS over tokens of the per-token L2 norm of each path's output and of their sum: {name: (B,)}."""
        return dict(core=_rms(self.core_out), univ=_rms(self.univ_out), output=_rms(self.core_out + self.univ_out))

    @property
    def path_shares(self) -> Dict[str, np.ndarray]:
        """Each path's projection onto the layer output, <path, out> / <out, out> per image: {name: (B,)}.

        The two shares add up to 1; a share above 1 (and a negative other) means the paths partly cancel.
        """
        core, univ = self.core_out.astype(np.float64), self.univ_out.astype(np.float64)
        out = core + univ
        denom = (out * out).sum((1, 2))
        return dict(core=(core * out).sum((1, 2)) / denom, univ=(univ * out).sum((1, 2)) / denom)

    def experts(self, path: str) -> np.ndarray:
        """Global indices of the experts of ``path`` ('core' or 'univ')."""
        if path == 'core':
            return np.arange(self.num_core_experts)
        if path == 'univ':
            return np.arange(self.num_core_experts, self.num_experts)
        raise ValueError(f"Unknown path '{path}': choose 'core' or 'univ'.")

    def top_experts(self, path: str, k: int) -> np.ndarray:
        """(B, k') global indices of the k most contributing experts of ``path`` per image, best first."""
        idx = self.experts(path)
        order = np.argsort(-self.expert_contrib[:, idx], axis=-1, kind='stable')[:, :k]
        return idx[order]

    def expert_label(self, e: int) -> str:
        """'core 3' or 'univ 12': the path and the index within it."""
        return f'core {e}' if e < self.num_core_experts else f'univ {e - self.num_core_experts}'


@dataclass
class RoutingInspection:
    """Routing of every SpheroMoE layer of a model on a few images (see ``inspect_routing``)."""
    images: np.ndarray  # (B, H, W, 3) the model's input, un-normalised to [0, 1] for display
    names: List[str]
    layers: Dict[str, LayerRouting]  # by module name, in forward order
    model_name: str = ''
    info: Dict[str, Any] = field(default_factory=dict)  # e.g. the data config, timings

    def to_dict(self, top_k: int = 3) -> Dict[str, Any]:
        """The numbers behind the figures, JSON-ready (rounded to 6 significant digits)."""
        layers = {}
        for name, lr in self.layers.items():
            norms, shares, share = lr.path_norms, lr.path_shares, lr.expert_share
            maps, prefix = lr.expert_dispatch, lr.prefix_dispatch
            top = []
            for b in range(len(self.names)):
                top.append({path: [
                    dict(expert=int(e), label=lr.expert_label(e), share=share[b, e],
                         prefix_dispatch=prefix[b, e], dispatch=maps[b, e])
                    for e in lr.top_experts(path, top_k)[b]] for path in ('core', 'univ')})
            layers[name] = dict(
                grid=list(lr.grid),
                num_prefix_tokens=lr.num_prefix_tokens,
                num_core_experts=lr.num_core_experts,
                num_univ_experts=lr.num_univ_experts,
                slots_per_expert=lr.slots_per_expert,
                core_norm=norms['core'], univ_norm=norms['univ'], output_norm=norms['output'],
                core_share=shares['core'], univ_share=shares['univ'],
                expert_share=share,
                top_experts=top,
            )
        return _jsonable(dict(model=self.model_name, images=self.names, info=self.info, layers=layers))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(f'{float(obj):.6g}')
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --- running the model --------------------------------------------------------------------------------------------

def _data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's eval data config for ``model`` as built, at the size of its patch grid also with
    ``dynamic_img_size=True`` (the model would run at the pretrained cfg's 224 too, but not on its grid)."""
    return model_data_config(model, getattr(getattr(model, 'patch_embed', None), 'img_size', None))


def _open_image(path: Union[str, os.PathLike], mode: str = 'RGB') -> 'PIL.Image.Image':
    """The image file at ``path``, decoded in full and converted to ``mode``; one-line errors that say the fix."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f'{path} is a folder, not an image: pass image files (e.g. {path / "*.jpg"}).')
    if not path.exists():
        raise FileNotFoundError(f'Image not found: {path}')
    if not path.is_file():
        raise ValueError(f'{path} is not a regular file: pass image files.')
    try:
        with Image.open(path) as f:
            return in_mode(f, mode)  # decodes every pixel: a truncated file fails here, not later
    except UnidentifiedImageError:
        reason = 'not an image format PIL knows'
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, unreadable, too large
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'Cannot read image {path}: {reason}; pass image files PIL can read (PNG, JPEG, ...).')


def _image_labels(paths: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """Each path's file name, or where two files share it, the shortest trailing part of the path that tells
    them apart ('a/cat.jpg', 'b/cat.jpg')."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for pi in parts:
        others = [pj for pj in parts if pj != pi]  # the same file twice cannot be told apart by its path
        k = 1
        while k < len(pi) and any(pj[-k:] == pi[-k:] for pj in others):
            k += 1
        labels.append(str(Path(*pi[-k:])))
    return labels


def _unique(names: List[str]) -> List[str]:
    """``names`` with a repeated one numbered: 'cat.jpg', 'cat.jpg (2)'."""
    seen: Dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f'{name} ({seen[name]})')
    return out


def _load_batch(images: ImageInput, data_config: Dict[str, Any]) -> Tuple[torch.Tensor, List[str]]:
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4:
            raise ValueError(f'Expected an image batch (B, C, H, W), got shape {tuple(images.shape)}.')
        return x, [f'image {i}' for i in range(x.shape[0])]
    from timm.data import create_transform
    images = list(images)
    chans = data_config['input_size'][0]
    # the model's channels, read as calibration reads them
    mode = image_mode(chans, f'pass the images as one (B, {chans}, H, W) tensor to inspect_routing(model, images) '
                             'in Python.')
    data_config = fit_channels(data_config, chans)  # a config given for the RGB model a grey one comes from
    transform = create_transform(**data_config, is_training=False)
    paths = [img for img in images if isinstance(img, (str, os.PathLike))]
    labels = iter(_image_labels(paths))
    tensors, names = [], []
    for i, img in enumerate(images):
        if isinstance(img, (str, os.PathLike)):
            img = _open_image(img, mode)
            names.append(next(labels))
        elif hasattr(img, 'convert'):
            img = in_mode(img, mode)
            names.append(f'image {i}')
        else:
            raise TypeError(f'Expected image paths, PIL images or one (B, C, H, W) tensor; got a {type(img).__name__}.')
        tensors.append(image_tensor(img, data_config, transform))
    if not tensors:
        raise ValueError('No images given.')
    return torch.stack(tensors), _unique(names)


def _token_grid(shape: torch.Size, num_prefix: int, image_hw: Tuple[int, int], patch_embed: Optional[nn.Module]):
    """(grid, num_prefix) of a SpheroMoE input: a channels-last map gives its own; a sequence is laid out
    on the patch grid when a ViT patch embedding gives it, else on the grid closest to the image's aspect."""
    if len(shape) == 4:
        return (int(shape[1]), int(shape[2])), 0
    n = int(shape[1]) - num_prefix
    if patch_embed is not None and hasattr(patch_embed, 'dynamic_feat_size'):
        gh, gw = patch_embed.dynamic_feat_size(image_hw)
        if gh * gw == n:
            return (int(gh), int(gw)), num_prefix
    # e.g. a ConvNeXt block that flattens its map: pick the factorisation n = gh * gw nearest the image aspect
    aspect = math.log(image_hw[0] / image_hw[1])
    gh = min((h for h in range(1, n + 1) if n % h == 0), key=lambda h: abs(math.log(h * h / n) - aspect))
    return (gh, n // gh), num_prefix


@torch.no_grad()
def inspect_routing(
        model: nn.Module,
        images: ImageInput,
        data_config: Optional[Dict[str, Any]] = None,
) -> RoutingInspection:
    """Run ``images`` through ``model`` in eval mode and collect the routing of every SpheroMoE layer.

    Args:
        model: any model with SpheroMoE layers (V-JetMoE, C-JetMoE, ...).
        images: image paths or PIL images (preprocessed with timm's eval transform for ``data_config``), or a
            (B, C, H, W) tensor already preprocessed that way.
        data_config: timm data config (default: ``resolve_model_data_config(model)`` at the model's input size).
    Returns:
        a ``RoutingInspection``; the model's training mode and routing-capture flags are left as they were.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no SpheroMoE layers: nothing to inspect (is it a JetMoE model?).')
    data_config = dict(data_config or _data_config(model))
    x, names = _load_batch(images, data_config)
    param = next(model.parameters())
    x = x.to(param.device, param.dtype)

    shapes: Dict[str, torch.Size] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, name=name: shapes.__setitem__(name, args[0].shape))
        for name, layer in layers.items()]
    was_capturing = {name: layer.capture_routing for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.capture_routing = True
            layer.last_routing = None  # a layer this forward does not reach must not report an older pass
        # eval: no dropout, drop path or (unless noise_at_eval) logit noise: the routing used at test time
        with eval_mode(model):
            start = time.perf_counter()
            model(x)
            seconds = time.perf_counter() - start
        info = routing_info(model)
    finally:
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            layer.capture_routing = was_capturing[name]
            if not was_capturing[name]:
                layer.last_routing = None

    image_hw = tuple(x.shape[-2:])
    num_prefix = int(getattr(model, 'num_prefix_tokens', 0))
    out = {}
    for name, layer in layers.items():
        grid, prefix = _token_grid(shapes[name], num_prefix, image_hw, getattr(model, 'patch_embed', None))
        r = {k: v.cpu().numpy() for k, v in info[name].items() if k != 'num_core_slots'}
        out[name] = LayerRouting(
            name=name, grid=grid, num_prefix_tokens=prefix, num_core_experts=layer.num_core_experts,
            num_univ_experts=layer.num_univ_experts, slots_per_expert=layer.slots_per_expert, **r)

    c = x.shape[1]
    mean = torch.tensor(data_config.get('mean', (0., 0., 0.)))[:c].view(-1, 1, 1)
    std = torch.tensor(data_config.get('std', (1., 1., 1.)))[:c].view(-1, 1, 1)
    shown = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    # RGB shown as it is, a 4th band (alpha, near infrared) left out; grey (and grey + alpha) shown as grey
    shown = (shown[:, :3] if c >= 3 else shown[:, :1].expand(-1, 3, -1, -1)).permute(0, 2, 3, 1).numpy()
    pretrained_cfg = getattr(model, 'pretrained_cfg', None) or {}
    return RoutingInspection(
        images=shown, names=names, layers=out,
        model_name=pretrained_cfg.get('architecture', type(model).__name__),
        info=dict(input_size=list(x.shape[1:]), forward_seconds=round(seconds, 4),
                  mean=list(data_config.get('mean', ())), std=list(data_config.get('std', ()))),
    )


# --- figures ------------------------------------------------------------------------------------------------------

def _figure(width: float, height: float, layout: Optional[str] = 'constrained'):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError('Plotting needs matplotlib: pip install "jetmoe_timm[demo]".') from None
    # a bare Figure renders with Agg and never touches pyplot's global state or backend
    return Figure(figsize=(width, height), layout=layout)


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A (gh, gw) map over an (H, W, 3) image as one RGB array: each token covers its cell of the image,
    coloured 0 .. the map's peak over the image in grey, more opaque where the map is high."""
    from matplotlib import colormaps
    H, W = image.shape[:2]
    gh, gw = heat.shape
    cells = heat[np.arange(H) * gh // H][:, np.arange(W) * gw // W]
    peak = cells.max()
    v = cells / peak if peak > 0 else cells
    colour = colormaps['inferno'](v)[..., :3]
    alpha = 0.8 * v[..., None]
    return alpha * colour + (1 - alpha) * image.mean(-1, keepdims=True)


def _short(name: str, n: int = 24) -> str:
    """At most n characters: the start and the end kept (a folder that tells two labels apart, a number before
    the extension), the middle elided."""
    if len(name) <= n:
        return name
    tail = (n - 3) // 2
    return name[:n - 3 - tail] + '...' + name[-tail:]


def plot_dispatch_maps(result: RoutingInspection, layer: str, top_k: int = 3):
    """Per image (rows): the image, then the dispatch maps of its top-k core and top-k universal experts.

    Each map is the expert's dispatch weight per token, on the token grid over the image (colour scale 0 to
    the map's peak). Titles: the expert's share of the layer output, its peak as a multiple of uniform and,
    for models with prefix tokens, the dispatch mass on them (not on the map).
    """
    if layer not in result.layers:
        raise ValueError(f"No MoE layer '{layer}'; the model has {list(result.layers)}.")
    lr = result.layers[layer]
    maps, share, prefix = lr.expert_dispatch, lr.expert_share, lr.prefix_dispatch
    tops = {path: lr.top_experts(path, top_k) for path in ('core', 'univ')}
    cols = 1 + sum(t.shape[1] for t in tops.values())
    B = len(result.names)
    # fixed margins in inches (constrained layout would double the drawing time of these many panels)
    panel, title, head = 1.6, 0.36, 0.4
    height = B * (panel + title) + head
    fig = _figure(cols * (panel + 0.08), height, layout=None)
    axes = fig.subplots(B, cols, squeeze=False, gridspec_kw=dict(
        left=0.005, right=0.995, bottom=0.005, top=1 - (head + title) / height, wspace=0.05, hspace=title / panel))
    n_grid = lr.grid[0] * lr.grid[1]
    for b in range(B):
        axes[b, 0].imshow(result.images[b])
        axes[b, 0].set_title(_short(result.names[b]), fontsize=8, y=1.0)
        col = 1
        for path, top in tops.items():
            for e in top[b]:
                m = maps[b, e]
                axes[b, col].imshow(_overlay(result.images[b], m))
                text = f'{lr.expert_label(e)}\n{100 * share[b, e]:.1f}% · peak {m.max() * n_grid:.1f}x'
                if lr.num_prefix_tokens:
                    text += f' · cls {100 * prefix[b, e]:.0f}%'
                axes[b, col].set_title(text, fontsize=7, color=_PATH_COLORS[path], y=1.0)
                col += 1
        for ax in axes[b]:
            ax.set_axis_off()
    fig.suptitle(f'{result.model_name} {layer}: where the top core (blue) and universal (orange) experts look',
                 fontsize=9, y=1 - 0.1 / height, va='top')
    return fig


def _ranked_bars(ax, heights: np.ndarray, colors: np.ndarray) -> None:
    # one PolyCollection instead of hundreds of bar artists: same picture, a fraction of the drawing time
    from matplotlib.collections import PolyCollection
    x = np.arange(len(heights))
    verts = np.stack([np.stack([x, np.zeros_like(heights)], -1), np.stack([x, heights], -1),
                      np.stack([x + 1, heights], -1), np.stack([x + 1, np.zeros_like(heights)], -1)], 1)
    ax.add_collection(PolyCollection(verts, facecolors=colors, edgecolors='none'))
    ax.set_xlim(0, len(heights))
    ax.set_ylim(0, heights.max() * 1.05)


def plot_contributions(result: RoutingInspection):
    """Top: per layer, the RMS token norm of the core path, the universal path and their sum (the layer
    output), averaged over images, with the core path's projection share on top. Bottom, one panel per layer:
    every expert's share of the output (mean over images), ranked, coloured by path."""
    names = list(result.layers)
    L = len(names)
    fig = _figure(max(8., 2.1 * L), 6.)
    grid = fig.add_gridspec(2, L, height_ratios=(1.1, 1.))
    ax = fig.add_subplot(grid[0, :])
    x = np.arange(L)
    width = 0.27
    norms = [result.layers[n].path_norms for n in names]
    for i, (key, label, color) in enumerate(
            (('core', 'core path', 'C0'), ('univ', 'universal path', 'C1'), ('output', 'layer output', '0.5'))):
        ax.bar(x + (i - 1) * width, [nm[key].mean() for nm in norms], width, label=label, color=color)
    for i, n in enumerate(names):
        share = result.layers[n].path_shares['core'].mean()
        top = max(norms[i]['core'].mean(), norms[i]['univ'].mean(), norms[i]['output'].mean())
        ax.annotate(f'core {100 * share:.0f}%', (x[i], top), ha='center', va='bottom', fontsize=7,
                    xytext=(0, 2), textcoords='offset points')
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel('RMS token norm')
    fig.suptitle(f'{result.model_name}: core vs universal contribution per MoE layer '
                 f'(mean of {len(result.names)} images; % = core share of the output)', fontsize=9)
    ax.legend(fontsize=7, loc='upper center', ncol=3, frameon=False)
    ax.margins(y=0.3)

    for i, n in enumerate(names):
        lr = result.layers[n]
        share = lr.expert_share.mean(0)
        order = np.argsort(-share, kind='stable')
        is_core = order < lr.num_core_experts
        sub = fig.add_subplot(grid[1, i])
        _ranked_bars(sub, share[order], np.where(is_core, _PATH_COLORS['core'], _PATH_COLORS['univ']))
        k = max(1, lr.num_experts // 10)
        sub.set_title(f'{n}\ntop 10% of experts: {100 * share[order[:k]].sum():.0f}%', fontsize=7)
        sub.set_xlabel('experts, ranked', fontsize=7)
        sub.tick_params(labelsize=6)
        if i == 0:
            sub.set_ylabel('share of output', fontsize=7)
    return fig


def save_inspection(result: RoutingInspection, out_dir: os.PathLike, top_k: int = 3, dpi: int = 100) -> List[Path]:
    """Write ``dispatch_<layer>.png`` per MoE layer, ``contributions.png`` and ``routing.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in result.layers:
        fig = plot_dispatch_maps(result, name, top_k=top_k)
        written.append(write_atomic(out_dir / f'dispatch_{name}.png', lambda p: fig.savefig(p, dpi=dpi, format='png')))
    fig = plot_contributions(result)
    written.append(write_atomic(out_dir / 'contributions.png', lambda p: fig.savefig(p, dpi=dpi, format='png')))
    text = json.dumps(result.to_dict(top_k=top_k), indent=1) + '\n'
    written.append(write_atomic(out_dir / 'routing.json', lambda p: p.write_text(text)))
    return written


# --- command line -------------------------------------------------------------------------------------------------

_KWARGS_LAST = 'it takes every word after it, so put --model-kwargs after the images'


def _parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """--model-kwargs K=V words -> kwargs, as ``convert`` parses them; a word that is no K=V is named, and when it
    looks like a file, so is the usual cause (--model-kwargs before the images)."""
    for item in items or ():
        if '=' not in item:
            if Path(item).suffix or os.path.exists(item):
                raise ValueError(f"--model-kwargs took '{item}', which is no K=V: {_KWARGS_LAST}.")
            raise ValueError(f"--model-kwargs: '{item}' is not of the form key=value (e.g. num_classes=0).")
    return parse_model_kwargs(items)


def _check_model_name(name: str) -> None:
    """An unknown or dense MODEL is named, with the models to pick from, before anything is built."""
    if ':' in name:  # hf-hub:..., local-dir:...: timm resolves the architecture from there
        return
    arch = check_model_name(name)
    if not is_jetmoe_model(arch):
        raise ValueError(f"'{arch}' is a dense timm model: it has no MoE layers to inspect. Pick a JetMoE model "
                         f"({list_jetmoe_models()}); a dense checkpoint becomes one with jetmoe-timm convert.")


def _is_json(path: Path) -> bool:
    """A small file that parses as JSON (never a weights file: safetensors starts with 8 length bytes)."""
    if path.suffix.lower() == '.json':
        return True
    try:
        if path.stat().st_size > 1 << 20:
            return False
        json.loads(path.read_bytes())
        return True
    except (OSError, ValueError):
        return False


def _check_checkpoint(name: str, checkpoint: Optional[str], pretrained: bool) -> None:
    """--checkpoint that cannot be loaded as MODEL's weights is named, with the fix, before the model is built."""
    import timm
    if checkpoint is None:
        return
    if pretrained:
        raise ValueError('--checkpoint and --pretrained both name the weights: pass only one.')
    path = Path(checkpoint)
    if path.is_dir():
        arch = read_model_config(path, 'pass a folder written by save_pretrained_folder / timm save_for_hf, or its '
                                       'weights file (MODEL and --model-kwargs then describe the model).')['architecture']
        if ':' not in name and arch != timm.models.split_model_name_tag(name)[0]:
            if timm.is_model(arch) and not is_jetmoe_model(arch):
                raise ValueError(
                    f"{path} holds a dense '{arch}', not a JetMoE model: convert it first (jetmoe-timm convert "
                    f"{name.partition('.')[0]} --predecessor local-dir:{path} --out CONVERTED), then pass "
                    f'--checkpoint CONVERTED.')
            if not timm.is_model(arch):
                raise ValueError(f"{path} holds a '{arch}', a model timm does not know: pass a JetMoE model folder.")
            raise ValueError(f"{path} holds a '{arch}', not a '{name}': pass MODEL {arch}.")
        if not any(f.is_file() and f.name.endswith(FOLDER_WEIGHT_SUFFIXES)
                   for f in path.iterdir()):
            raise FileNotFoundError(f'{path} has no weights (model.safetensors): pass a folder written by '
                                    f'save_pretrained_folder / timm save_for_hf, or the weights file itself.')
        return
    if not path.exists():
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    if not path.is_file():
        raise ValueError(f'--checkpoint {path} is not a regular file: pass a weights file or a model folder.')
    if _is_json(path):
        raise ValueError(f'--checkpoint {path} is a JSON file, not a weights file: pass the folder {path.parent} or '
                         f'its model.safetensors.')
    if path.name.endswith('.safetensors'):
        from ..models._pretrained import refuse_damaged
        refuse_damaged(str(path))  # a truncated or foreign file fails now, not after building the model
    elif not is_torch_checkpoint(path):
        raise ValueError(f'--checkpoint {path} is no PyTorch checkpoint (neither a zip archive nor a pickle): pass '
                         f'a .safetensors or .pth file of the model.')


def _create_model(name: str, checkpoint: Optional[str], pretrained: bool, model_kwargs: Dict[str, Any]) -> nn.Module:
    import timm
    if checkpoint is None:
        try:
            return timm.create_model(name, pretrained=pretrained, **model_kwargs)
        except WeightsUnavailableError as e:  # its ways out are the Python API's: here a file is --checkpoint
            raise WeightsUnavailableError(str(e).replace('pass pretrained_cfg_overlay=dict(file=...) (train.py: '
                                                         '--pretrained-path)', 'pass --checkpoint')) from None
    path = Path(checkpoint)
    if path.is_dir():
        return timm.create_model(f'local-dir:{path}', pretrained=True, **model_kwargs)
    overlay = dict(file=str(path), custom_load=False)
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **model_kwargs)
    except ValueError as e:  # weights of another model: where they sit in a model folder, its config.json knows it
        if (path.parent / 'config.json').is_file() and str(e).startswith('The checkpoint holds'):
            raise ValueError(f'{e} Or pass the folder it is in, whose config.json describes the model: --checkpoint '
                             f'{path.parent}') from None
        raise
    except (RuntimeError, pickle.UnpicklingError) as e:  # timm re-raises torch.load's UnpicklingError
        unpickling = e if isinstance(e, pickle.UnpicklingError) else e.__cause__
        if not isinstance(unpickling, pickle.UnpicklingError):
            raise
        objects = re.search(r'Unsupported globals?: (?:GLOBAL )?([\w.]+(?:, [\w.]+)*)', str(e))
        if objects:
            found = objects.group(1).rstrip('.')
            raise ValueError(f'--checkpoint {path} holds Python objects besides tensors ({found}): save '
                             f'the weights alone (torch.save(model.state_dict(), ...) or a .safetensors file) and '
                             f'pass that.') from None
        reason = re.search(r'WeightsUnpickler error:\s*([^\n]+)', str(unpickling))
        reason = reason.group(1).strip() if reason else quoted(unpickling)
        raise ValueError(f'Cannot read --checkpoint {path} as weights, it is no PyTorch checkpoint (torch.load: '
                         f'{reason}): pass a .safetensors or .pth file of the model.') from None


def _summary(result: RoutingInspection) -> List[str]:
    """One line per MoE layer: the paths' shares of the output and each path's most often top expert."""
    lines = []
    for name, lr in result.layers.items():
        shares = lr.path_shares
        paths = [p for p in ('core', 'univ') if len(lr.experts(p))]  # a single-path layer has no top in the other
        tops = ', '.join(lr.expert_label(int(np.bincount(lr.top_experts(p, 1)[:, 0]).argmax())) for p in paths)
        lines.append(f'{name:<16} core {100 * shares["core"].mean():5.1f}%  universal '
                     f'{100 * shares["univ"].mean():5.1f}% of the output; most often top: {tops}')
    return lines


def _run(args: argparse.Namespace) -> int:
    # every input is checked before the model is built (minutes for a full-size model recycled with --pretrained)
    model_kwargs = _parse_model_kwargs(args.model_kwargs)
    if args.top_k < 1:
        raise ValueError(f'--top-k must be >= 1, got {args.top_k}.')
    check_output_folder(args.out, overwrite=True)
    _check_model_name(args.model)
    check_model_kwargs(args.model, model_kwargs)
    _check_checkpoint(args.model, args.checkpoint, args.pretrained)
    check_device(args.device)
    for image in args.images:
        _open_image(image)
    start = time.perf_counter()
    model = _create_model(args.model, args.checkpoint, args.pretrained, model_kwargs)
    model.to(args.device)
    loaded = time.perf_counter()
    result = inspect_routing(model, args.images)
    inspected = time.perf_counter()
    summary = _summary(result)  # before any file is written: a failure here leaves no figures behind
    written = save_inspection(result, args.out, top_k=args.top_k)
    done = time.perf_counter()

    print('\n'.join(summary))
    print(f'model {loaded - start:.1f}s, inspect {inspected - loaded:.1f}s, figures {done - inspected:.1f}s; '
          f'wrote {len(written)} files to {args.out}')
    if args.checkpoint is None and not args.pretrained:
        print('note: random init (no --checkpoint or --pretrained): the figures show untrained routing.',
              file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jetmoe-timm inspect``."""
    p = subparsers.add_parser(
        'inspect', help='figures of where the experts look and what core / universal experts contribute',
        description='Run a few images through a JetMoE model and write, per MoE layer, the dispatch maps of its '
                    'top experts over each image, a core vs universal contribution chart, and routing.json '
                    '(see docs/inspect.md).')
    p.add_argument('model', help='timm model name, e.g. v_jetmoe_tiny')
    p.add_argument('images', nargs='+', help='image files')
    p.add_argument('--checkpoint', help='weights: a .safetensors / .pth file, or a folder with config.json')
    p.add_argument('--pretrained', action='store_true', help="load the model's default pretrained weights")
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='model kwargs, as in timm train.py (e.g. num_classes=10); after the images, since it takes '
                        'every word after it')
    p.add_argument('--out', default='inspect', help='output folder (default: ./inspect)')
    p.add_argument('--top-k', type=int, default=3, help='experts shown per path and image (default: 3)')
    p.add_argument('--device', default='cpu', help='torch device (default: cpu)')
    p.set_defaults(func=_run)
    return p
