""" Recycling a timm ConvNeXt into a C-JetMoE successor: probes, selection and the key plan.

Stage s of the successor comes from stage s of the predecessor, block b from block b. Each stage keeps one
channel index set ``stage{s}.channels`` (top channels by the stage-averaged statistic of the blocks' norm
outputs), used consistently in the stem or downsample conv that writes the stage, every depthwise conv, norm,
layer scale and MLP of the stage, and the next downsample's input. Experts are sampled from the pointwise
MLPs exactly as for ViT (shared selection code).
"""
from typing import Dict

import torch
from timm.models.convnext import ConvNeXt

from ..layers import SpheroMoE
from ..models.convnext_jetmoe import RECYCLED_FROM, ConvNeXtJetMoE
from .family import FamilySpec
from .rules import Take, expert_takes
from .selection import METHODS, dense_neurons, make_generator, select_experts, top_k
from .stats import Probe


def _blocks(model):
    """(stage, block, module name, block module) for every block."""
    for s, stage in enumerate(model.stages):
        for b, blk in enumerate(stage.blocks):
            yield s, b, f'stages.{s}.blocks.{b}', blk



# layer scale -> the linear whose output it scales, folded into it when the successor has none (ls_init_value=None)
SCALE_RULES = {r'stages\.(\d+)\.blocks\.(\d+)\.gamma': r'stages.\1.blocks.\2.mlp.fc2'}




def resize(pred, succ):
    """ConvNeXt takes any input size: the predecessor as it is (statistics run at the successor's size)."""
    return pred


def body_width(model) -> int:
    return model.num_features


def check(pred, succ) -> None:
    """Raise a clear error when ``pred`` cannot be recycled into ``succ``."""
    if not isinstance(pred, ConvNeXt) or any(isinstance(blk.mlp, SpheroMoE) for *_, blk in _blocks(pred)):
        raise ValueError(f'a C-JetMoE successor needs a dense timm ConvNeXt predecessor, got {type(pred).__name__}: '
                         f'pass a ConvNeXt checkpoint (e.g. convnext_tiny.fb_in22k).')
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
    blk = pred.stages[0].blocks[0]
    if not hasattr(blk.mlp, 'fc1') or blk.mlp.fc1.__class__.__name__ != 'Linear':
        raise ValueError('the predecessor must be built with conv_mlp=False (Linear pointwise MLPs).')
    if pred.stem[0].kernel_size != succ.stem[0].kernel_size:
        raise ValueError('predecessor and successor stems differ (patch vs overlap stem).')


def probes(pred, succ, method: str):
    out = []
    for s, b, name, blk in _blocks(succ):
        coact = METHODS[method].needs_coactivation and isinstance(blk.mlp, SpheroMoE)
        out += [Probe(f'{name}.norm'), Probe(f'{name}.mlp.act', coact=coact)]
    return out


class WeightStats:
    """Data-free statistics: |norm gain| per channel, |fc1 row| * |fc2 column| per hidden neuron."""

    def __init__(self, pred):
        self.pred = pred
        self.num_images = 0
        self.source = 'weights'

    def __getitem__(self, key) -> torch.Tensor:
        module, _ = key
        blk = self.pred.get_submodule(module.rsplit('.', 2)[0] if module.endswith('mlp.act') else module.rsplit('.', 1)[0])
        with torch.no_grad():
            if module.endswith('.norm'):
                return blk.norm.weight.double().abs()
            return blk.mlp.fc1.weight.double().norm(dim=1) * blk.mlp.fc2.weight.double().norm(dim=0)

    def coact(self, module):
        raise ValueError("co-activation needs activation statistics: pass calibration images, not calib='weights'.")


def select(pred, succ, stats, method: str, statistic: str, seed: int, recipe: str) -> Dict[str, torch.Tensor]:
    sel: Dict[str, torch.Tensor] = {}
    for s, stage in enumerate(succ.stages):
        names = [f'stages.{s}.blocks.{b}' for b in range(len(stage.blocks))]
        score = torch.stack([stats[f'{n}.norm', statistic] for n in names]).mean(0)
        sel[f'stage{s}.channels'] = top_k(score, succ.feature_info[s]['num_chs'])
    for s, b, name, blk in _blocks(succ):
        importance = stats[f'{name}.mlp.act', statistic]
        if not isinstance(blk.mlp, SpheroMoE):
            sel[f'{name}.mlp'] = dense_neurons(method, blk.mlp.fc1.out_features, importance,
                                               make_generator(seed, 'mlp', name))
            continue
        core, univ, parts = select_experts(blk.mlp, importance, method, seed, name,
                                           lambda: stats.coact(f'{name}.mlp.act'))
        if parts is not None:
            sel[f'{name}.graph_parts'] = parts
        sel[f'{name}.core_neurons'] = core
        sel[f'{name}.univ_neurons'] = univ
    return sel


def plan(pred, succ, sel: Dict[str, torch.Tensor], recipe: str) -> Dict[str, Take]:
    p: Dict[str, Take] = {}
    ch0 = sel['stage0.channels']
    p['stem.0.weight'] = Take('stem.0.weight', (ch0,))
    p['stem.0.bias'] = Take('stem.0.bias', (ch0,))
    p['stem.1.weight'] = Take('stem.1.weight', (ch0,))
    p['stem.1.bias'] = Take('stem.1.bias', (ch0,))
    for s, stage in enumerate(succ.stages):
        ch = sel[f'stage{s}.channels']
        if s > 0:
            prev = sel[f'stage{s - 1}.channels']
            d = f'stages.{s}.downsample'
            p[f'{d}.0.weight'] = Take(f'{d}.0.weight', (prev,))
            p[f'{d}.0.bias'] = Take(f'{d}.0.bias', (prev,))
            p[f'{d}.1.weight'] = Take(f'{d}.1.weight', (ch[:, None], prev[None, :]))
            p[f'{d}.1.bias'] = Take(f'{d}.1.bias', (ch,))
        for b, blk in enumerate(stage.blocks):
            name = f'stages.{s}.blocks.{b}'
            for key in ('conv_dw.weight', 'conv_dw.bias', 'norm.weight', 'norm.bias', 'gamma'):
                if f'{name}.{key}' in succ.state_dict():
                    p[f'{name}.{key}'] = Take(f'{name}.{key}', (ch,))
            if isinstance(blk.mlp, SpheroMoE):
                for path in ('core', 'univ'):
                    if getattr(blk.mlp, f'{path}_experts') is not None:
                        p.update(expert_takes(f'{name}.mlp.{path}_experts', f'{name}.mlp',
                                              sel[f'{name}.{path}_neurons'], ch))
                continue
            n = sel[f'{name}.mlp']
            p[f'{name}.mlp.fc1.weight'] = Take(f'{name}.mlp.fc1.weight', (n[:, None], ch[None, :]))
            p[f'{name}.mlp.fc1.bias'] = Take(f'{name}.mlp.fc1.bias', (n,))
            p[f'{name}.mlp.fc2.weight'] = Take(f'{name}.mlp.fc2.weight', (ch[:, None], n[None, :]))
            p[f'{name}.mlp.fc2.bias'] = Take(f'{name}.mlp.fc2.bias', (ch,))
    last = sel[f'stage{len(succ.stages) - 1}.channels']
    succ_keys = succ.state_dict()
    for key in ('head.norm.weight', 'head.norm.bias', 'norm_pre.weight', 'norm_pre.bias'):
        if key in succ_keys:
            p[key] = Take(key, (last,))
    fc_w, pred_fc_w = getattr(succ.head.fc, 'weight', None), getattr(pred.head.fc, 'weight', None)
    if fc_w is not None and pred_fc_w is not None and fc_w.shape[0] == pred_fc_w.shape[0]:
        p['head.fc.weight'] = Take('head.fc.weight', (slice(None), last))
        p['head.fc.bias'] = Take('head.fc.bias')
    return p


SPEC = FamilySpec(
    name='convnext',
    model_cls=ConvNeXtJetMoE,
    recycled_from=RECYCLED_FROM,
    check=check,
    resize=resize,
    probes=probes,
    select=select,
    plan=plan,
    weight_stats=WeightStats,
    body_width=body_width,
    scale_rules=SCALE_RULES,
    features_module='head.fc',  # its input is the pooled pre-logits feature
    official_recipe=False,
)
