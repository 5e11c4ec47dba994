""" Recycling a timm ConvNeXt into a C-JetMoE successor: probes, selection and the key plan.

Stage s of the successor comes from stage s of the predecessor, block b from block b. Each stage keeps one
channel index set ``stage{s}.channels`` (top channels by the stage-averaged statistic of the blocks' norm
outputs), used consistently in the stem or downsample conv that writes the stage, every depthwise conv, norm,
layer scale and MLP of the stage, and the next downsample's input. Experts are sampled from the pointwise
MLPs exactly as for ViT (shared selection code).
"""
from typing import Dict

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXt

from ..layers import SpheroMoE
from ..models.convnext_jetmoe import RECYCLED_FROM, ConvNeXtJetMoE
from .family import FamilySpec, LayerOption, UnsupportedPredecessor, check_activation, layer_args
from .rules import Rule, Take, expert_takes, plan_from_rules
from .selection import METHODS, select_block_neurons, top_k
from .stats import Probe, WeightStatistics, mlp_weight_importance


def _blocks(model):
    """(stage, block, module name, block module) for every block."""
    for s, stage in enumerate(model.stages):
        for b, blk in enumerate(stage.blocks):
            yield s, b, f'stages.{s}.blocks.{b}', blk


# layer scale -> the linear whose output it scales, folded into it when the successor has none (ls_init_value=None)
SCALE_RULES = {r'stages\.(\d+)\.blocks\.(\d+)\.gamma': r'stages.\1.blocks.\2.mlp.fc2'}

# the options that decide which tensors a ConvNeXt has (FamilySpec.layer_options)
LAYER_OPTIONS = (
    LayerOption(r'norm_pre\.', 'head_norm_first', True, False),
    LayerOption(r'head\.norm\.', 'head_norm_first', False, True),
    LayerOption(r'(?:stem\.0|stages\.\d+\.(?:downsample\.1|blocks\.\d+\.conv_dw))\.bias', 'conv_bias', True, False),
)

_GRN = ('predecessor MLPs have a global response norm (ConvNeXt-V2): they cannot be split into experts; pass a '
        'ConvNeXt (V1) checkpoint, e.g. convnext_tiny.fb_in22k.')


def predecessor_args(state: Dict[str, torch.Tensor], hint) -> Dict:
    """timm ConvNeXt arguments of a bare (timm-format) checkpoint, read off its tensors. The head is dropped."""
    if any('.mlp.grn.' in k for k in state):  # said as check says it, not as a file that fits no ConvNeXt
        raise UnsupportedPredecessor(_GRN)
    stages = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('stages.'))
    depths = tuple(1 + max(int(k.split('.')[3]) for k in state if k.startswith(f'stages.{s}.blocks.'))
                   for s in range(stages))
    dims = tuple(state[f'stages.{s}.blocks.0.conv_dw.weight'].shape[0] for s in range(stages))
    stem = state['stem.0.weight']
    hidden = state.get('head.pre_logits.fc.weight')  # ConvNeXt-L/XL 'mlp' heads
    return dict(depths=depths, dims=dims, in_chans=stem.shape[1], patch_size=stem.shape[-1],
                ls_init_value=1. if 'stages.0.blocks.0.gamma' in state else None,
                conv_mlp=state['stages.0.blocks.0.mlp.fc1.weight'].ndim == 4,
                head_hidden_size=hidden.shape[0] if hidden is not None else None, num_classes=0,
                **layer_args(LAYER_OPTIONS, state, hint.state_dict()))


def resize(pred, succ):
    """ConvNeXt takes any input size: the predecessor as it is (statistics run at its data config's size)."""
    return pred


def check(pred, succ) -> None:
    """Raise a clear error when ``pred`` cannot be recycled into ``succ``."""
    if not isinstance(pred, ConvNeXt) or any(isinstance(blk.mlp, SpheroMoE) for *_, blk in _blocks(pred)):
        raise ValueError(f'a C-JetMoE successor needs a dense timm ConvNeXt predecessor, got {type(pred).__name__}: '
                         f'pass a ConvNeXt checkpoint (e.g. convnext_tiny.fb_in22k).')
    blk = pred.stages[0].blocks[0]
    if not isinstance(getattr(blk.mlp, 'fc1', None), nn.Linear):  # conv_mlp's are 1x1 convolutions
        raise ValueError('the predecessor keeps its MLPs as 1x1 convolutions (conv_mlp=True: timm\'s convnext_atto '
                         'to convnext_nano), which are not recycled: pass a ConvNeXt with Linear MLPs (convnext_tiny '
                         'and wider).')
    if len(pred.stages) != len(succ.stages):
        raise ValueError(f'predecessor has {len(pred.stages)} stages, the successor {len(succ.stages)}.')
    for s, (ps, ss) in enumerate(zip(pred.stages, succ.stages)):
        if len(ss.blocks) > len(ps.blocks):
            raise ValueError(f'stage {s}: the successor has {len(ss.blocks)} blocks, the predecessor only '
                             f'{len(ps.blocks)}.')
        dp, ds = pred.feature_info[s]['num_chs'], succ.feature_info[s]['num_chs']
        if ds > dp:
            raise ValueError(f'stage {s}: successor width {ds} exceeds the predecessor width {dp}: pick a wider '
                             f'predecessor or smaller dims.')
    if not isinstance(getattr(blk.mlp, 'grn', None), (nn.Identity, type(None))):
        raise UnsupportedPredecessor(_GRN)
    check_activation(blk.mlp, succ.stages[0].blocks[0].mlp)
    for name, model in (('predecessor', pred), ('successor', succ)):
        if len(model.stem) != 2:  # a conv and its norm; an overlap stem has more layers, of other widths
            raise ValueError(f"the {name} has a stem of {len(model.stem)} layers (stem_type='overlap'), which is not "
                             f"recycled: use ConvNeXts with timm's patch stem (stem_type='patch', the default).")
    kernel = lambda stage: stage.blocks[0].conv_dw.kernel_size[0] if len(stage.blocks) else None  # noqa: E731
    kernels = [kernel(stage) for stage in pred.stages]
    if any(kernel(ss) not in (None, k) for ss, k in zip(succ.stages, kernels)):
        raise ValueError(f'predecessor and successor depthwise kernels differ: build the successor with '
                         f'kernel_sizes={kernels}.')
    if pred.stem[0].kernel_size != succ.stem[0].kernel_size:
        patch = pred.stem[0].kernel_size
        raise ValueError(f'predecessor and successor stems differ: patches of {patch} and '
                         f'{succ.stem[0].kernel_size}; build the successor with patch_size={patch[0]}.')


# where a block is measured: its channels (the norm's output) and hidden neurons (the MLP activation's output);
# probes, the data-free statistics and the selection read these names
_CHANNELS, _NEURONS = 'norm', 'mlp.act'


def probes(pred, succ, method: str):
    out = []
    for s, b, name, blk in _blocks(succ):
        coact = METHODS[method].needs_coactivation and isinstance(blk.mlp, SpheroMoE)
        out += [Probe(f'{name}.{_CHANNELS}'), Probe(f'{name}.{_NEURONS}', coact=coact)]
    return out


class WeightStats(WeightStatistics):
    """Data-free statistics: |norm gain| per channel, |fc1 row| * |fc2 column| per hidden neuron."""

    def __getitem__(self, key) -> torch.Tensor:
        module, _ = key
        if module.endswith(f'.{_CHANNELS}'):
            return self.pred.get_submodule(module).weight.detach().double().abs()
        if module.endswith(f'.{_NEURONS}'):  # '{block}.mlp.act'
            return mlp_weight_importance(self.pred.get_submodule(module.removesuffix(f'.{_NEURONS}')).mlp)
        raise KeyError(module)


def select(pred, succ, stats, method: str, statistic: str, seed: int, recipe: str) -> Dict[str, torch.Tensor]:
    sel: Dict[str, torch.Tensor] = {}
    for s, stage in enumerate(succ.stages):
        names = [f'stages.{s}.blocks.{b}' for b in range(len(stage.blocks))]
        score = torch.stack([stats[f'{n}.{_CHANNELS}', statistic] for n in names]).mean(0)
        sel[f'stage{s}.channels'] = top_k(score, succ.feature_info[s]['num_chs'])
    for s, b, name, blk in _blocks(succ):
        neurons = select_block_neurons(blk.mlp, stats[f'{name}.{_NEURONS}', statistic], method, seed, name,
                                       lambda: stats.coact(f'{name}.{_NEURONS}'))
        sel.update({f'{name}.{k}': v for k, v in neurons.items()})
    return sel


# which index set selects each dimension of each recycled tensor (successor key patterns; see rules.Rule):
# stage s keeps 'stage{s}.channels'; a downsample reads the previous stage's ('stage{s}.in')
RULES = (
    Rule(r'stem\.[01]\.(?:weight|bias)', ('stage0.channels',)),
    Rule(r'stages\.(\d+)\.downsample\.0\.(?:weight|bias)', ('stage{0}.in',)),
    Rule(r'stages\.(\d+)\.downsample\.1\.weight', ('stage{0}.channels', 'stage{0}.in')),
    Rule(r'stages\.(\d+)\.downsample\.1\.bias', ('stage{0}.channels',)),
    Rule(r'stages\.(\d+)\.blocks\.\d+\.(?:conv_dw\.weight|conv_dw\.bias|norm\..*|gamma|mlp\.fc2\.bias)',
         ('stage{0}.channels',)),
    Rule(r'(stages\.(\d+)\.blocks\.\d+)\.mlp\.fc1\.weight', ('{0}.mlp', 'stage{1}.channels')),
    Rule(r'(stages\.\d+\.blocks\.\d+)\.mlp\.fc1\.bias', ('{0}.mlp',)),
    Rule(r'(stages\.(\d+)\.blocks\.\d+)\.mlp\.fc2\.weight', ('stage{1}.channels', '{0}.mlp')),
    Rule(r'(?:head\.norm|norm_pre)\.(?:weight|bias)', ('last.channels',)),
    Rule(r'head\.pre_logits\.fc\.weight', (None, 'last.channels')),  # head_hidden_size (convnext_*_mlp)
    Rule(r'head\.pre_logits\.fc\.bias', (None,)),
    Rule(r'head\.fc\.weight', (None, 'head.in')),  # the last stage's channels, or every hidden unit
    Rule(r'head\.fc\.bias', (None,)),
)


def _pre_logits_width(model) -> int:
    """Width of the head's hidden layer (``head_hidden_size``), 0 without one."""
    fc = getattr(getattr(model.head, 'pre_logits', None), 'fc', None)  # ClassifierHead (head_norm_first) has none
    return fc.out_features if fc is not None else 0


def plan(pred, succ, sel: Dict[str, torch.Tensor], recipe: str, body=None) -> Dict[str, Take]:
    """Successor key -> Take for every tensor recycled from the predecessor."""
    idx = dict(sel)
    num_stages = len(succ.stages)
    # a stage-0 downsample (patch_size < 4) reads the stem's output: the first stage's channels
    for s in range(num_stages):
        idx[f'stage{s}.in'] = sel[f'stage{max(s - 1, 0)}.channels']
    idx['last.channels'] = sel[f'stage{num_stages - 1}.channels']
    idx['head.in'] = torch.arange(_pre_logits_width(succ)) if _pre_logits_width(succ) else idx['last.channels']
    fc_w, pred_fc_w = getattr(succ.head.fc, 'weight', None), getattr(pred.head.fc, 'weight', None)
    # the head's hidden layer (head_hidden_size) whenever both have one of the same width: with num_classes=0 its
    # output is the model's feature; the classifier only when it means the same thing: same classes, reading the
    # same hidden layer (or none) of the same pooling
    same_hidden = _pre_logits_width(succ) == _pre_logits_width(pred)
    same_pool = succ.head.global_pool.pool_type == pred.head.global_pool.pool_type
    same_head = fc_w is not None and pred_fc_w is not None and fc_w.shape[0] == pred_fc_w.shape[0] and same_hidden \
        and same_pool
    keys = [k for k in succ.state_dict() if (same_head or not k.startswith('head.fc.'))
            and (same_hidden or not k.startswith('head.pre_logits.'))]
    p = plan_from_rules(RULES, keys, idx)
    for s, b, name, blk in _blocks(succ):
        for path in blk.mlp.expert_groups() if isinstance(blk.mlp, SpheroMoE) else ():
            p.update(expert_takes(f'{name}.mlp.{path}_experts', f'{name}.mlp', sel[f'{name}.{path}_neurons'],
                                  sel[f'stage{s}.channels']))
    return p


SPEC = FamilySpec(
    model_cls=ConvNeXtJetMoE,
    predecessor_cls=ConvNeXt,
    recycled_from=RECYCLED_FROM,
    predecessor_args=predecessor_args,
    check=check,
    resize=resize,
    probes=probes,
    select=select,
    plan=plan,
    weight_stats=WeightStats,
    scale_rules=SCALE_RULES,
    features_module='head.fc',  # its input is the pooled pre-logits feature
    block_pattern=r'stages\.\d+\.blocks\.\d+\.',
    new_head=r'head\.(?:fc|pre_logits)\.',
    layer_options=LAYER_OPTIONS,
)
