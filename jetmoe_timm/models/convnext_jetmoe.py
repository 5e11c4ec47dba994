""" C-JetMoE: ConvNeXts whose later pointwise MLPs are SpheroMoE layers (MoE Jetpack, Zhu et al. 2024).

The model is timm's ``ConvNeXt`` (built with ``conv_mlp=False``, so each block runs its norm and MLP
channels-last) with the MLP of each block in ``moe_blocks`` replaced by a ``SpheroMoE`` layer that sees the
H*W positions as tokens. Stem, downsampling, depthwise convs, norms, layer scale (``gamma``), drop path,
residuals, head, features and grad checkpointing are timm's own, and so are all parameter names outside
``stages.{s}.blocks.{b}.mlp``: a timm ConvNeXt state dict maps onto this model key for key except there.

Pretrained tags ``*.recycled_in22k`` are never fine-tuned inits recycled from a timm ImageNet-22k ConvNeXt
(see ``jetmoe_timm.recycle``): built locally on first ``pretrained=True`` load when no converted copy can be
downloaded. They carry no classifier (``num_classes=0``): fine-tune with your own head.

Paper: `MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801
"""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as _convnext_checkpoint_filter_fn

from ._moe import JetMoEMixin, MoEOptions
from ._pretrained import PAPER_CFG, build_jetmoe, recycled_cfgs

__all__ = ['ConvNeXtJetMoE', 'RECYCLED_FROM']


# Experts per stage from the paper's rule of thumb at 224 px: N/2 core and 2 x that many universal experts,
# N the stage's tokens (56^2, 28^2, 14^2, 7^2). Stages 3 and 4 give C-JetMoE-F's 98/196 and 24/48.
_CORE_EXPERTS_224 = (1568, 392, 98, 24)
_UNIV_EXPERTS_224 = (3136, 784, 196, 48)


def _per_stage(value: Union[int, Sequence[int]], num_stages: int, name: str) -> Tuple[int, ...]:
    """Broadcast an int to every stage, or check a per-stage sequence."""
    if isinstance(value, int):
        return (value,) * num_stages
    value = tuple(int(v) for v in value)
    if len(value) != num_stages:
        raise ValueError(f'{name} needs one value per stage ({num_stages}), got {value}; or pass a single int.')
    return value


class ConvNeXtJetMoE(JetMoEMixin, ConvNeXt):
    """timm ConvNeXt with SpheroMoE layers in place of the pointwise MLPs of ``moe_blocks``."""
    moe_norm = 'norm'
    dense_mlp_keys = ('.fc1.weight', '.pwconv1.weight')  # timm's layout, FB's

    def __init__(
            self,
            moe_blocks: Optional[Iterable[int]] = None,
            num_core_experts: Union[int, Sequence[int]] = _CORE_EXPERTS_224,
            num_univ_experts: Union[int, Sequence[int]] = _UNIV_EXPERTS_224,
            core_mlp_ratio: float = 4.,
            univ_ratio: float = 0.25,
            slots_per_expert: int = 1,
            routing: str = 'sphero',
            moe_combine: Optional[str] = None,
            moe_noise_mult: Optional[float] = None,
            moe_noise_at_eval: bool = False,
            moe_drop_rate: float = 0.,
            moe_drop_mode: str = 'element',
            moe_drop_path_rate: Optional[float] = None,
            **kwargs,
    ):
        """
        Args:
            moe_blocks: 0-based indices over all blocks of all stages (stage by stage) whose MLP becomes a
                SpheroMoE layer (default: the later half, blocks sum(depths)//2 .. sum(depths)-1).
            num_core_experts / num_univ_experts: experts per path in each MoE block, one int for every stage or
                one per stage (default: the paper's N/2 and N for N tokens of the stage at 224 px).
            core_mlp_ratio: core expert hidden width relative to the stage width (4, as the dense MLP).
            univ_ratio: universal expert hidden width relative to the core hidden width.
            slots_per_expert: slots per expert.
            routing: SpheroMoE routing preset ('sphero', 'official' or 'softmoe').
            moe_combine: override the preset's combine ('softmax' or 'entmax15').
            moe_noise_mult / moe_noise_at_eval: logit noise std (default 1/E) and whether it runs in eval too.
            moe_drop_rate / moe_drop_mode: dropout inside the experts, 'element' (official) or 'expert'.
            moe_drop_path_rate: peak expert drop path, on the block drop-path schedule (default: drop_path_rate).
            **kwargs: timm ``ConvNeXt`` arguments (depths, dims, drop_path_rate, ...); ``conv_mlp`` must stay False.
        """
        if kwargs.get('conv_mlp', False):
            raise ValueError('C-JetMoE needs conv_mlp=False: SpheroMoE takes channels-last (B, H, W, C) tokens.')
        if kwargs.get('use_grn', False):  # the MoE blocks' experts would silently lack it
            raise ValueError('C-JetMoE needs use_grn=False: its experts are plain MLPs, without the global response '
                             'norm of ConvNeXt-V2.')
        super().__init__(**kwargs)
        options = MoEOptions(
            univ_ratio=univ_ratio, slots_per_expert=slots_per_expert, routing=routing, moe_combine=moe_combine,
            moe_noise_mult=moe_noise_mult, moe_noise_at_eval=moe_noise_at_eval, moe_drop_rate=moe_drop_rate,
            moe_drop_mode=moe_drop_mode, moe_drop_path_rate=moe_drop_path_rate)
        depths = [len(stage.blocks) for stage in self.stages]
        total = sum(depths)
        self.moe_blocks = self._resolve_moe_blocks(moe_blocks, total, f' over all blocks, depths {depths}')
        core = _per_stage(num_core_experts, len(depths), 'num_core_experts')
        univ = _per_stage(num_univ_experts, len(depths), 'num_univ_experts')
        act_layer = get_act_layer(kwargs.get('act_layer', 'gelu'))  # as ConvNeXt resolves it
        first = self.stem[0].weight
        for i in self.moe_blocks:
            s, b = self._stage_block(i)
            dim = self.feature_info[s]['num_chs']
            self.stages[s].blocks[b].mlp = self._make_moe(
                dim, i, total, options, core[s], univ[s], int(dim * core_mlp_ratio), act_layer,
                kwargs.get('drop_path_rate', 0.), device=first.device, dtype=first.dtype)

    def _stage_block(self, index: int) -> Tuple[int, int]:
        """Global 0-based block index -> (stage, block within the stage)."""
        for s, stage in enumerate(self.stages):
            if index < len(stage.blocks):
                return s, index
            index -= len(stage.blocks)
        raise IndexError(index)

    def dense_layout(self) -> str:
        depths = tuple(len(s.blocks) for s in self.stages)
        dims = tuple(f['num_chs'] for f in self.feature_info)
        return f'a ConvNeXt with depths {depths} and widths {dims}'

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Groups for layer-wise lr decay (timm ConvNeXt's stages / blocks), with the MoE layers and the norm
        feeding them in the head's group (full learning rate), as the official ViT recipe does. The rest of a MoE
        block (conv_dw, gamma) decays with the block."""
        moe_params = self._moe_group_pattern()
        return dict(
            stem=r'^stem',
            blocks=rf'^(?!{moe_params})stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),  # with the stage's first block, as timm ConvNeXt
                (rf'^(?!{moe_params})stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm_pre', (99999,)),
            ],
            head=rf'^(?:{moe_params}|head\.)',
        )


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ConvNeXtJetMoE) -> Dict[str, torch.Tensor]:
    """Unwrap and map the FB ConvNeXt layout to timm keys; another model's checkpoint (a dense ConvNeXt's) is
    refused in one message (``JetMoEMixin.check_checkpoint``)."""
    state_dict = state_dict.get('state_dict', state_dict.get('model', state_dict))
    return model.filter_checkpoint(state_dict, _convnext_checkpoint_filter_fn)


def _create_convnext_jetmoe(variant: str, pretrained: bool = False, model_args: Optional[Dict] = None, **kwargs) -> ConvNeXtJetMoE:
    # model_args: the entrypoint's architecture; kwargs: what the user asked for on top of it
    return build_jetmoe(
        ConvNeXtJetMoE,
        variant,
        pretrained,
        model_args=model_args,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0',
        'classifier': 'head.fc',
        **PAPER_CFG,
        **kwargs,
    }


# pretrained tag -> the dense timm checkpoint its weights are recycled from ('remark': said in the tag's notes);
# jetmoe_timm.recycle builds them on first load, and the tags' pretrained cfgs come from this table (recycled_cfgs)
RECYCLED_FROM = {
    'c_jetmoe_femto.recycled_in22k': dict(predecessor='convnext_tiny.fb_in22k'),
    'c_jetmoe_tiny.recycled_in22k': dict(
        predecessor='convnext_base.fb_in22k',
        remark='the next wider ImageNet-22k ConvNeXt; the paper has no C-JetMoE-T'),
}

default_cfgs = generate_default_cfgs(recycled_cfgs(_cfg, RECYCLED_FROM))


@register_model
def c_jetmoe_femto(pretrained: bool = False, **kwargs) -> ConvNeXtJetMoE:
    """C-JetMoE-F: ConvNeXt-T at half width (48..384) with SpheroMoE in blocks 9..17 (98/196 experts at 14x14,
    24/48 at 7x7)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))
    return _create_convnext_jetmoe('c_jetmoe_femto', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def c_jetmoe_tiny(pretrained: bool = False, **kwargs) -> ConvNeXtJetMoE:
    """C-JetMoE-T: ConvNeXt-T (96..768) with SpheroMoE in blocks 9..17 (98/196 experts at 14x14, 24/48 at 7x7)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_convnext_jetmoe('c_jetmoe_tiny', pretrained=pretrained, model_args=model_args, **kwargs)
