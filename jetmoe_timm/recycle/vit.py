""" Recycling a timm VisionTransformer into a V-JetMoE successor: probes, selection and the key plan.

Successor block i comes from predecessor block i. Residual channels are one index set ``channels`` used
everywhere (patch embedding, position embedding, tokens, norms, attention and MLP inputs / outputs). Attention
keeps whole heads (top heads by the statistic of their output dims) and, if the successor's heads are
narrower, the same top dims within every kept head, for q, k and v alike.
"""
import copy
import dataclasses
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from ..layers import SpheroMoE
from ..models.vit_jetmoe import RECYCLED_FROM, VisionTransformerJetMoE
from .family import FamilySpec, LayerOption, UnreadableCheckpoint, UnsupportedPredecessor, check_activation, \
    layer_args
from .rules import Rule, Take, expert_takes, plan_from_rules
from .selection import METHODS, make_generator, select_block_neurons, select_neurons, top_k
from .stats import Probe, WeightStatistics, mlp_weight_importance


# layer scale (DeiT-3, DINOv2, CaiT-style ``ls1`` / ``ls2``) -> the linear whose output it scales; folded into that
# linear when the successor has no layer scale (``rules.fold_scales``)
SCALE_RULES = {
    r'blocks\.(\d+)\.ls1\.gamma': r'blocks.\1.attn.proj',
    r'blocks\.(\d+)\.ls2\.gamma': r'blocks.\1.mlp.fc2',
}


def _head_dim(model: VisionTransformer) -> int:
    attn = model.blocks[0].attn
    return attn.head_dim


def _moe(model, i) -> Optional[SpheroMoE]:
    mlp = model.blocks[i].mlp
    return mlp if isinstance(mlp, SpheroMoE) else None


def check(pred, succ) -> None:
    """Raise a clear error when ``pred`` cannot be recycled into ``succ``."""
    if not isinstance(pred, VisionTransformer) or any(isinstance(b.mlp, SpheroMoE) for b in pred.blocks):
        raise ValueError(f'a V-JetMoE successor needs a dense timm VisionTransformer predecessor, got '
                         f'{type(pred).__name__}: pass a ViT checkpoint (e.g. vit_small_patch16_224.augreg_in21k; '
                         f'RoPE ViTs such as EVA are not supported).')
    _check_blocks(pred)  # first: the head and width limits below assume standard blocks
    d, d_s = pred.embed_dim, succ.embed_dim
    if d_s > d:
        raise ValueError(f'successor width {d_s} exceeds the predecessor width {d}: pick a wider predecessor '
                         f'or a smaller embed_dim.')
    h, h_s = pred.blocks[0].attn.num_heads, succ.blocks[0].attn.num_heads
    if h_s > h:
        raise ValueError(f'successor has {h_s} attention heads, the predecessor only {h}: use num_heads <= {h} (if '
                         f'the predecessor is a bare checkpoint file, which does not record its heads, they were '
                         f"assumed {_head_dim(pred)} wide: pass a 'local-dir:' folder with its config.json if they "
                         f'are narrower).')
    if _head_dim(succ) > _head_dim(pred):
        raise ValueError(f'successor head_dim {_head_dim(succ)} exceeds the predecessor head_dim {_head_dim(pred)}: '
                         f'use more heads (num_heads) or a smaller embed_dim.')
    if len(succ.blocks) > len(pred.blocks):
        raise ValueError(f'successor depth {len(succ.blocks)} exceeds the predecessor depth {len(pred.blocks)}: use '
                         f'depth <= {len(pred.blocks)}, or a deeper predecessor.')
    if (succ.cls_token is None) != (pred.cls_token is None) or succ.num_reg_tokens != pred.num_reg_tokens:
        tokens = lambda m: f"class_token={m.cls_token is not None}, reg_tokens={m.num_reg_tokens}"  # noqa: E731
        raise ValueError(f'predecessor and successor must agree on class / register tokens: the predecessor has '
                         f'{tokens(pred)}, the successor {tokens(succ)}: give the successor --model-kwargs '
                         f'{tokens(pred).replace(",", "")}.')
    if getattr(pred, 'dist_token', None) is not None:
        raise UnsupportedPredecessor(_DISTILLED)
    if getattr(pred, 'attn_pool', None) is not None:
        raise UnsupportedPredecessor(_ATTENTION_POOL)
    check_activation(pred.blocks[0].mlp, succ.blocks[0].mlp)


_DISTILLED = ('predecessor is a distilled DeiT (a distillation token): not supported; pass a non-distilled '
              'checkpoint (e.g. deit_small_patch16_224).')

# the options that decide which tensors a ViT has (FamilySpec.layer_options)
LAYER_OPTIONS = (
    LayerOption(r'norm_pre\.', 'pre_norm', True, False),
    LayerOption(r'patch_embed\.norm\.', 'embed_norm_layer', 'layernorm', None),
    LayerOption(r'(?:fc_)?norm\.', 'final_norm', True, False),  # timm has an fc_norm only with a final norm
    LayerOption(r'blocks\.\d+\.attn\.qkv\.bias', 'qkv_bias', True, False),
    LayerOption(r'blocks\.\d+\.attn\.[qk]_norm\.', 'qk_norm', True, False),
    LayerOption(r'blocks\.\d+\.attn\.proj\.bias', 'proj_bias', True, False),
)

# the heads timm's ViTs of these widths have where they are not 64 wide (ViT-H, g, G, so400m, 2B, 6B: timm 1.0's
# vision_transformer configs without qk-norm, which would give their head width); other widths: 64-wide heads
_HEADS_OF_WIDTH = {1152: 16, 1280: 16, 1408: 16, 1664: 16, 2048: 16, 3072: 24}
_ATTENTION_POOL = ("predecessor pools with attention (global_pool='map', e.g. SigLIP): not recycled; pass a "
                   "checkpoint with token or average pooling.")


def _check_blocks(pred) -> None:
    """Refuse, in one line, predecessor blocks whose computation the recycling plan would not reproduce."""
    blk = pred.blocks[0]
    if type(blk) is not Block:
        raise ValueError(f'predecessor blocks are {type(blk).__name__}, not timm\'s pre-norm Block (post-norm and '
                         f'parallel blocks cannot be recycled): pass a standard ViT checkpoint.')
    if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity):
        inner = ' with an inner norm' if type(blk.mlp) is Mlp else ''
        raise ValueError(f'predecessor MLPs are {type(blk.mlp).__name__}{inner}: only plain fc1 -> act -> fc2 MLPs '
                         f'can be split into experts (GLU / SwiGLU cannot).')
    if type(blk.attn) is not Attention:  # e.g. DiffAttention: heads of two halves, which the head selection splits
        raise ValueError(f'predecessor attention is {type(blk.attn).__name__}, not timm\'s multi-head Attention: '
                         f'only standard ViT attention can be recycled; pass a standard ViT checkpoint.')
    if not isinstance(getattr(blk.attn, 'norm', nn.Identity()), nn.Identity):
        raise ValueError('predecessor attention has an inner norm (scale_attn_norm): not supported; pass a '
                         'standard ViT checkpoint.')


def predecessor_args(state: Dict[str, torch.Tensor], hint) -> Dict:
    """timm VisionTransformer arguments of a bare (timm-format) checkpoint, read off its tensors; heads come from
    the qk-norm weights (one per head dimension) where it has them, else as timm's ViTs of that width have them
    (``_HEADS_OF_WIDTH``, else heads as wide as ``hint``'s, the tag's predecessor built on the meta device: 64 in
    timm's ViTs). The head is dropped."""
    if 'dist_token' in state:  # said as check says it, not as a file that fits no ViT
        raise UnsupportedPredecessor(_DISTILLED)
    if any(k.startswith('attn_pool.') for k in state):
        raise UnsupportedPredecessor(_ATTENTION_POOL)
    d, c, p = state['patch_embed.proj.weight'].shape[:3]
    q_norm = state.get('blocks.0.attn.q_norm.weight')
    num_heads = d // q_norm.shape[0] if q_norm is not None else _HEADS_OF_WIDTH.get(d, d // _head_dim(hint))
    prefix = int('cls_token' in state) + (state['reg_token'].shape[1] if 'reg_token' in state else 0)
    n_pos = state['pos_embed'].shape[1]
    # (grid side, no_embed_class): a square grid after the prefix tokens' rows, or a square grid alone with prefix
    # tokens that have no position embedding (DeiT-3, DINOv2-reg); tiny grids can fit both (9 rows and 5 prefix
    # tokens: 3x3 alone or 2x2 after 5), which the tensors cannot tell apart
    readings = [(math.isqrt(n), no_embed) for n, no_embed in ((n_pos - prefix, False), (n_pos, True))
                if n > 0 and math.isqrt(n) ** 2 == n and (prefix or not no_embed)]
    if len(readings) != 1:
        fits = ' and '.join(f'a {g}x{g} patch grid with no_embed_class={e}' for g, e in readings)
        raise UnreadableCheckpoint(f'its pos_embed of {n_pos} rows ({prefix} prefix tokens) fits '
                                   + (f'both {fits}' if fits else 'no square patch grid'))
    ((grid, no_embed_class),) = readings
    return dict(
        embed_dim=d, in_chans=c, patch_size=p, img_size=grid * p, num_heads=max(1, num_heads),
        depth=1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.')),
        mlp_ratio=state['blocks.0.mlp.fc1.weight'].shape[0] / d,
        init_values=1. if 'blocks.0.ls1.gamma' in state else None,
        class_token='cls_token' in state, reg_tokens=prefix - int('cls_token' in state),
        no_embed_class=no_embed_class, fc_norm='fc_norm.weight' in state,
        global_pool='avg' if 'fc_norm.weight' in state or 'cls_token' not in state else 'token', num_classes=0,
        # layers most checkpoints have or lack alike, given where the file's differ from the architecture's (CLIP:
        # pre-norm and no patch bias, no final norm in some; qkv bias, qk-norm, a LayerNorm after the patch embedding)
        **layer_args(LAYER_OPTIONS, state, hint.state_dict()))


def resize(pred, succ):
    """The predecessor re-expressed in the successor's input layout: its input size, patch size and position
    embedding convention (a changed copy; ``pred`` itself if they agree).

    Position and patch embeddings are resampled with timm's own ``set_input_size`` (as exact as resampling can
    be), so statistics can be taken and weights recycled in the regime the successor will run in (its tokens, its
    resolution). Class / register tokens with or without position embeddings (``no_embed_class``: DeiT-3, DINOv2
    with registers) are moved to the successor's convention exactly: a token without one gets a zero embedding,
    and one with an embedding that the successor does not add carries it in the token itself.
    """
    size, patch = tuple(succ.patch_embed.img_size), tuple(succ.patch_embed.patch_size)
    same_size = (tuple(pred.patch_embed.img_size), tuple(pred.patch_embed.patch_size)) == (size, patch)
    if same_size and pred.no_embed_class == succ.no_embed_class:
        return pred
    pred = _copy_input_layers(pred)
    if not same_size:
        pred.set_input_size(img_size=size, patch_size=patch)
    if pred.no_embed_class != succ.no_embed_class and pred.pos_embed is not None and pred.num_prefix_tokens:
        _move_prefix_embedding(pred, to_tokens=succ.no_embed_class)
    return pred


def _copy_input_layers(model):
    """A copy of ``model`` that owns what ``resize`` changes (patch embedding, position embedding, prefix tokens)
    and shares the rest, its blocks: the bulk of its weights, which a deep copy would hold twice (1.2 GB for a
    DINOv2-L)."""
    new = copy.copy(model)
    new._modules, new._parameters, new._buffers = dict(model._modules), dict(model._parameters), dict(model._buffers)
    new.patch_embed = copy.deepcopy(model.patch_embed)
    for name in ('pos_embed', 'cls_token', 'reg_token'):
        p = getattr(model, name, None)
        if p is not None:
            setattr(new, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    return new


@torch.no_grad()
def _move_prefix_embedding(model, to_tokens: bool) -> None:
    """Switch ``model`` between prefix tokens with and without position embeddings, keeping its function."""
    n = model.num_prefix_tokens
    pos = model.pos_embed.data
    if to_tokens:  # the prefix rows of the embedding go into the tokens themselves
        prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
        rows = pos[:, :n]
        for t in prefix:
            t.add_(rows[:, :t.shape[1]])
            rows = rows[:, t.shape[1]:]
        model.pos_embed = nn.Parameter(pos[:, n:].clone())
    else:  # prefix tokens get an embedding of zeros
        model.pos_embed = nn.Parameter(torch.cat([pos.new_zeros(1, n, pos.shape[-1]), pos], dim=1))
    model.no_embed_class = to_tokens


# where block i is measured: the residual channels (norm2's output), each attention dim (attn.proj's input), each
# hidden neuron (the MLP activation's output); probes, the data-free statistics and the selection read these names
def _channels(i: int) -> str:
    return f'blocks.{i}.norm2'


def _attn_dims(i: int) -> str:
    return f'blocks.{i}.attn.proj'


def _neurons(i: int) -> str:
    return f'blocks.{i}.mlp.act'


def probes(pred, succ, method: str):
    out = []
    for i in range(len(succ.blocks)):
        out += [
            Probe(_channels(i)),
            Probe(_attn_dims(i), on_input=True),
            Probe(_neurons(i), coact=METHODS[method].needs_coactivation and _moe(succ, i) is not None),
        ]
    return out


class WeightStats(WeightStatistics):
    """Data-free statistics: |norm2 gain| per channel, and for each attention dim or hidden neuron the product of
    its input and output weight norms."""

    def __getitem__(self, key) -> torch.Tensor:
        module, _ = key
        i = int(module.split('.')[1])
        blk = self.pred.blocks[i]
        with torch.no_grad():
            if module == _channels(i):
                return blk.norm2.weight.double().abs()
            if module == _attn_dims(i):
                return blk.attn.proj.weight.double().norm(dim=0) * blk.attn.qkv.weight.double().view(
                    3, -1, blk.attn.qkv.weight.shape[-1])[2].norm(dim=1)
            if module == _neurons(i):
                return mlp_weight_importance(blk.mlp)
        raise KeyError(module)


def select(pred, succ, stats, method: str, statistic: str, seed: int, recipe: str) -> Dict[str, torch.Tensor]:
    """The index sets of a recycling, as flat {name: LongTensor} (stored for audit)."""
    d_s = succ.embed_dim
    depth = len(succ.blocks)
    sel: Dict[str, torch.Tensor] = {}
    channel_score = torch.stack([stats[_channels(i), statistic] for i in range(depth)]).mean(0)
    channels = top_k(channel_score, d_s)
    sel['channels'] = channels

    h, hd = pred.blocks[0].attn.num_heads, _head_dim(pred)
    h_s, hd_s = succ.blocks[0].attn.num_heads, _head_dim(succ)
    for i in range(depth):
        dim_score = stats[_attn_dims(i), statistic].view(h, hd)
        heads = top_k(dim_score.sum(1), h_s)
        within = top_k(dim_score[heads].sum(0), hd_s)  # the same dims in every kept head (q, k, v alike)
        sel[f'blocks.{i}.heads'] = heads
        sel[f'blocks.{i}.attn_dims'] = (heads[:, None] * hd + within[None, :]).flatten()

        neurons = select_block_neurons(succ.blocks[i].mlp, stats[_neurons(i), statistic], method, seed, i,
                                       lambda: stats.coact(_neurons(i)))
        sel.update({f'blocks.{i}.{k}': v for k, v in neurons.items()})
        moe = _moe(succ, i)
        if moe is not None and recipe == 'official':
            # each expert also samples its own input / output channels, as the official tool does
            ch_importance = stats[_channels(i), statistic]
            ch_method = METHODS[method].dense_method or method  # channels have no co-activation graph
            sel[f'blocks.{i}.core_channels'] = select_neurons(
                ch_method, moe.num_core_experts, d_s, ch_importance, make_generator(seed, 'core-ch', i))
            sel[f'blocks.{i}.univ_channels'] = select_neurons(
                ch_method, moe.num_univ_experts, d_s, ch_importance, make_generator(seed, 'univ-ch', i))
    return sel


# which index set selects each dimension of each recycled tensor (successor key patterns; see rules.Rule)
RULES = (
    Rule(r'cls_token|reg_token|pos_embed', ('...', 'channels')),
    Rule(r'patch_embed\.(?:proj\.weight|proj\.bias|norm\..*)|norm_pre\..*', ('channels',)),
    Rule(r'blocks\.(\d+)\.(?:norm1|norm2|ls1|ls2)\..*', ('channels',)),
    Rule(r'blocks\.(\d+)\.attn\.qkv\.weight', ('blocks.{0}.qkv_rows', 'channels')),
    Rule(r'blocks\.(\d+)\.attn\.qkv\.bias', ('blocks.{0}.qkv_rows',)),
    Rule(r'blocks\.(\d+)\.attn\.[qk]_norm\..*', ('blocks.{0}.head_dims',)),
    Rule(r'blocks\.(\d+)\.attn\.proj\.weight', ('channels', 'blocks.{0}.attn_dims')),
    Rule(r'blocks\.(\d+)\.(?:attn\.proj|mlp\.fc2)\.bias', ('channels',)),
    Rule(r'blocks\.(\d+)\.mlp\.fc1\.weight', ('blocks.{0}.mlp', 'channels')),
    Rule(r'blocks\.(\d+)\.mlp\.fc1\.bias', ('blocks.{0}.mlp',)),
    Rule(r'blocks\.(\d+)\.mlp\.fc2\.weight', ('channels', 'blocks.{0}.mlp')),
    Rule(r'head\.weight', (None, 'channels')),
    Rule(r'head\.bias', (None,)),
)


def _indices(pred, succ, sel: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The selection plus the index sets derived from it: q/k/v rows and the dims within a head, per block."""
    out = dict(sel)
    hd_p, hd_s = _head_dim(pred), _head_dim(succ)
    for i, blk in enumerate(pred.blocks[:len(succ.blocks)]):
        dims = sel[f'blocks.{i}.attn_dims']
        out[f'blocks.{i}.qkv_rows'] = torch.cat([dims + k * blk.attn.qkv.out_features // 3 for k in range(3)])
        out[f'blocks.{i}.head_dims'] = dims[:hd_s] % hd_p
    return out


def _keep_attention_temperature(p: Dict[str, Take], succ, ratio: float) -> None:
    """Narrower heads (head_dim hd_s of the predecessor's hd): the successor's attention divides q.k by sqrt(hd_s)
    where the predecessor divided by sqrt(hd); the queries are scaled by sqrt(hd_s / hd) so that the kept dims give
    the logits they gave. A q_norm carries the scale (it normalises q after qkv); else the q rows of qkv do."""
    s = torch.tensor(ratio ** 0.5)
    for i, blk in enumerate(succ.blocks):
        prefix = f'blocks.{i}.attn'
        if f'{prefix}.q_norm.weight' in p:
            targets = {f'{prefix}.q_norm.{n}': s for n in ('weight', 'bias')}
        else:
            q_rows = torch.ones(blk.attn.qkv.out_features)
            q_rows[:blk.attn.qkv.out_features // 3] = s
            targets = {f'{prefix}.qkv.weight': q_rows[:, None], f'{prefix}.qkv.bias': q_rows}
        for key, scale in targets.items():
            if key in p:
                p[key] = dataclasses.replace(p[key], scale=scale)


def _identity(body, succ) -> Dict[str, torch.Tensor]:
    """Index sets that take the same-width body predecessor whole (the official recipe)."""
    state = body.state_dict()
    out = {'channels': torch.arange(succ.embed_dim)}
    for i in range(len(succ.blocks)):
        out[f'blocks.{i}.attn_dims'] = torch.arange(state[f'blocks.{i}.attn.proj.weight'].shape[1])
        out[f'blocks.{i}.mlp'] = torch.arange(state[f'blocks.{i}.mlp.fc1.weight'].shape[0])
    return _indices(body, succ, out)


def plan(pred, succ, sel: Dict[str, torch.Tensor], recipe: str, body=None) -> Dict[str, Take]:
    """Successor key -> Take, for every tensor recycled from the predecessor(s), which ``resize`` has brought to
    the successor's grid, patch size and token convention. The official recipe takes the body whole from the
    same-width ``body`` predecessor and only the experts from ``pred``."""
    keys = list(succ.state_dict())
    src = body if recipe == 'official' else pred  # what the body, final norm and head are taken from
    # the final norm: the predecessor's pre-pool norm also serves as the successor's post-pool fc_norm
    succ_norm = 'fc_norm' if len(list(succ.fc_norm.parameters())) else 'norm'
    src_norm = 'fc_norm' if len(list(src.fc_norm.parameters())) else 'norm'
    # the classifier only when it means the same thing: same classes, same pooling, the norm on the same side of it
    head_w, src_head_w = getattr(succ.head, 'weight', None), getattr(src.head, 'weight', None)
    same_head = (head_w is not None and src_head_w is not None and head_w.shape[0] == src_head_w.shape[0]
                 and succ.global_pool == src.global_pool and succ_norm == src_norm
                 and getattr(succ, 'pool_include_prefix', False) == getattr(src, 'pool_include_prefix', False))
    keys = [k for k in keys if same_head or not k.startswith('head.')]
    if recipe == 'official':
        p = plan_from_rules(RULES, keys, _identity(body, succ), predecessor='body')
    else:
        p = plan_from_rules(RULES, keys, _indices(pred, succ, sel))
    if recipe != 'official' and _head_dim(succ) != _head_dim(pred):
        _keep_attention_temperature(p, succ, _head_dim(succ) / _head_dim(pred))
    ch, source = (torch.arange(succ.embed_dim), 'body') if recipe == 'official' else (sel['channels'], 'main')
    src_keys = src.state_dict()
    for name, _ in getattr(succ, succ_norm).named_parameters():
        if f'{src_norm}.{name}' in src_keys:  # a predecessor without a final norm leaves the successor's
            p[f'{succ_norm}.{name}'] = Take(f'{src_norm}.{name}', (Ellipsis, ch), predecessor=source)
    # experts: fc1 / fc2 of every expert sampled from the block's dense MLP in the (main) predecessor
    for i in range(len(succ.blocks)):
        moe = _moe(succ, i)
        for path in moe.expert_groups() if moe is not None else ():
            p.update(expert_takes(f'blocks.{i}.mlp.{path}_experts', f'blocks.{i}.mlp',
                                  sel[f'blocks.{i}.{path}_neurons'],
                                  sel.get(f'blocks.{i}.{path}_channels', sel['channels'])))
    return p


def body_width(model) -> int:
    return model.embed_dim


SPEC = FamilySpec(
    model_cls=VisionTransformerJetMoE,
    predecessor_cls=VisionTransformer,
    recycled_from=RECYCLED_FROM,
    predecessor_args=predecessor_args,
    check=check,
    resize=resize,
    probes=probes,
    select=select,
    plan=plan,
    weight_stats=WeightStats,
    body_width=body_width,
    scale_rules=SCALE_RULES,
    features_module='head',  # its input is the pooled pre-logits feature
    block_pattern=r'blocks\.\d+\.',
    new_head=r'(?:head|attn_pool)\.',
    layer_options=LAYER_OPTIONS,
    # a rectangular grid whose rows (+ prefix) make a square would be read as a square one: 14 x 16 + 1 = 15^2
    assumed="num_heads as most of timm's ViTs of that width have them (64-wide heads; 16 for ViT-H, g, G, so400m) "
            "where no qk-norm weights give their width, a square patch grid, exact GELU (SigLIP's is the tanh one)",
)
