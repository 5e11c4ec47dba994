""" V-JetMoE: Vision Transformers whose later MLPs are SpheroMoE layers (MoE Jetpack, Zhu et al. 2024).

The model is timm's ``VisionTransformer`` with the MLP of each block in ``moe_blocks`` replaced by a
``SpheroMoE`` layer, so patch embedding, attention, pooling, features, grad checkpointing and
``forward_intermediates`` are timm's own. Blocks stay pre-norm: ``x + drop_path(moe(norm2(x)))``.

Pretrained tags ``*.recycled_in21k`` (from timm ImageNet-21k ViTs) and ``*.recycled_deit3_in22k`` (from DeiT-3
ImageNet-22k checkpoints) are never fine-tuned inits recycled from their dense predecessor (``RECYCLED_FROM``,
see ``jetmoe_timm.recycle``): built locally on first ``pretrained=True`` load when no converted copy can be
downloaded. They carry no classifier (``num_classes=0``): fine-tune with your own head.

Paper: `MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801
"""
import math
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import Mlp, get_act_layer
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ..layers import SpheroMoE
from ..official import OFFICIAL_DATA_CFG, convert_official_pre_hook, is_official_state_dict, official_to_timm
from ._moe import JetMoEMixin, MoEOptions
from ._pretrained import HF_ORG, PAPER_CFG, build_jetmoe, recycled_cfgs

__all__ = ['RECYCLED_FROM', 'VisionTransformerJetMoE']

_EXPERT_INIT_MODES = ('jax', 'moco')  # timm's ViT init modes (and their variants, jax_nlhb) that differ for MLPs


class VisionTransformerJetMoE(JetMoEMixin, VisionTransformer):
    """timm VisionTransformer with SpheroMoE layers in place of the MLPs of ``moe_blocks``."""
    moe_norm = 'norm2'

    def __init__(
            self,
            moe_blocks: Optional[Iterable[int]] = None,
            num_core_experts: int = 98,
            num_univ_experts: int = 196,
            core_hidden: Optional[int] = None,
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
            moe_blocks: 0-based indices of the blocks whose MLP becomes a SpheroMoE layer (default: the later
                half, blocks depth//2 .. depth-1, as in the paper).
            num_core_experts / num_univ_experts: experts per path in every MoE block.
            core_hidden: core expert hidden width (default: the dense MLP's, mlp_ratio * embed_dim).
            univ_ratio: universal expert hidden width relative to core_hidden.
            slots_per_expert: slots per expert.
            routing: SpheroMoE routing preset ('sphero', 'official' or 'softmoe').
            moe_combine: override the preset's combine ('softmax' or 'entmax15').
            moe_noise_mult / moe_noise_at_eval: logit noise std (default 1/E) and whether it runs in eval too.
            moe_drop_rate / moe_drop_mode: dropout inside the experts, 'element' (official) or 'expert'.
            moe_drop_path_rate: peak expert drop path, on the block drop-path schedule (default: drop_path_rate).
            **kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, embed_dim, depth, ...).
        """
        mlp_layer = kwargs.get('mlp_layer', Mlp)
        if mlp_layer is not Mlp:  # the MoE blocks' experts would silently be plain MLPs
            name = getattr(getattr(mlp_layer, 'func', mlp_layer), '__name__', mlp_layer)  # a partial: its class
            raise ValueError(f"V-JetMoE needs timm's plain Mlp (fc1 -> act -> fc2), not mlp_layer={name}: its experts "
                             f"are plain MLPs.")
        super().__init__(**kwargs)
        options = MoEOptions(
            univ_ratio=univ_ratio, slots_per_expert=slots_per_expert, routing=routing, moe_combine=moe_combine,
            moe_noise_mult=moe_noise_mult, moe_noise_at_eval=moe_noise_at_eval, moe_drop_rate=moe_drop_rate,
            moe_drop_mode=moe_drop_mode, moe_drop_path_rate=moe_drop_path_rate)
        depth = len(self.blocks)
        self.moe_blocks = self._resolve_moe_blocks(moe_blocks, depth)
        act_layer = get_act_layer(kwargs.get('act_layer')) or nn.GELU  # as VisionTransformer resolves it
        first = self.patch_embed.proj.weight
        for i in self.moe_blocks:
            self.blocks[i].mlp = self._make_moe(
                self.embed_dim, i, depth, options, num_core_experts, num_univ_experts,
                core_hidden or int(self.embed_dim * kwargs.get('mlp_ratio', 4.)), act_layer,
                kwargs.get('drop_path_rate', 0.), device=first.device, dtype=first.dtype)
        if kwargs.get('weight_init', '') != 'skip':  # timm's init ran on the dense MLPs replaced here
            self._init_experts(kwargs.get('weight_init', ''))
        # official MoE Jetpack state dicts load as they are, e.g. with timm.models.load_checkpoint
        self.register_load_state_dict_pre_hook(convert_official_pre_hook)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """timm's ViT init, ``mode`` included for the experts: timm's per-module init passes by their stacked
        weights (it resets them to timm's default init, whatever the mode)."""
        super().init_weights(mode, needs_reset)  # its fix_init_weight has scaled the experts it reset
        if (mode or self.weight_init_mode).startswith(_EXPERT_INIT_MODES):
            self._init_experts(mode or self.weight_init_mode)

    def _init_experts(self, mode: str) -> None:
        """Initialise every expert as timm's init ``mode`` does a ViT MLP's ``nn.Linear`` ('jax': xavier-uniform
        weights, N(0, 1e-6) biases; 'moco': xavier-uniform, zero biases; other modes: ExpertLinear's own init,
        timm's default), fan in and out those of one expert; then ``fix_init``'s scaling."""
        # the layers there are, not moe_blocks: timm's __init__ calls this before the MoE layers (and moe_blocks) exist
        moe = [i for i, block in enumerate(self.blocks) if isinstance(block.mlp, SpheroMoE)]
        if mode.startswith(_EXPERT_INIT_MODES):
            with torch.no_grad():
                for i in moe:
                    for group in self.blocks[i].mlp.expert_groups().values():
                        for fc in (group.fc1, group.fc2):
                            bound = math.sqrt(6. / (fc.in_features + fc.out_features))
                            fc.weight.uniform_(-bound, bound)
                            fc.bias.normal_(std=1e-6) if mode.startswith('jax') else fc.bias.zero_()
        if self.fix_init:
            self._fix_init_mlps(moe)

    def fix_init_weight(self) -> None:
        """timm's init fix, each block's output projections divided by sqrt(2 * layer id): in a MoE block those of
        its experts (timm's own reads ``mlp.fc2``, which a SpheroMoE layer has not)."""
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                layer.attn.proj.weight.div_(math.sqrt(2.0 * (layer_id + 1)))
        self._fix_init_mlps(range(len(self.blocks)))

    def _fix_init_mlps(self, indices: Iterable[int]) -> None:
        """``fix_init_weight``'s scaling of the MLP output projections of blocks ``indices``: the dense ``fc2``, or
        the ``fc2`` of every expert group."""
        with torch.no_grad():
            for i in indices:
                mlp = self.blocks[i].mlp
                for group in mlp.expert_groups().values() if isinstance(mlp, SpheroMoE) else (mlp,):
                    group.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def dense_layout(self) -> str:
        pe = self.patch_embed
        return (f'a ViT with {len(self.blocks)} blocks of width {self.embed_dim} '
                f'({self.blocks[0].attn.num_heads} heads), patch {pe.patch_size[0]} at {pe.img_size[0]} px')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Groups for layer-wise lr decay: timm ViT's, with the MoE layers and their ``norm2`` in the head's group
        (full learning rate), as in the official recipe."""
        moe_params = self._moe_group_pattern()
        return dict(
            stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre',
            blocks=[(rf'^(?!{moe_params})blocks\.(\d+)', None), (r'^norm\.', (99999,))],
            head=rf'^(?:{moe_params}|fc_norm|head|attn_pool)',
        )


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformerJetMoE) -> Dict[str, torch.Tensor]:
    """Unwrap, resample position embeddings to the model's grid, and map the official layout if found."""
    state_dict = state_dict.get('state_dict', state_dict.get('model', state_dict))
    if is_official_state_dict(state_dict):
        state_dict = official_to_timm(state_dict, model)
    return model.filter_checkpoint(state_dict, _vit_checkpoint_filter_fn)


def _create_vit_jetmoe(variant: str, pretrained: bool = False, model_args: Optional[Dict] = None, **kwargs) -> VisionTransformerJetMoE:
    # model_args: the entrypoint's architecture; kwargs: what the user asked for on top of it
    tag = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg')).tag
    if tag == 'official_in1k':  # the official weights are only the official model with its entmax15 combine
        model_args = dict(model_args or {}, routing='official')
    out_indices = kwargs.pop('out_indices', 3)
    return build_jetmoe(
        VisionTransformerJetMoE,
        variant,
        pretrained,
        model_args=model_args,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs):
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_INCEPTION_MEAN,
        'std': IMAGENET_INCEPTION_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        **PAPER_CFG,
        **kwargs,
    }


# pretrained tag -> the dense timm checkpoint its weights are recycled from ('body_predecessor': the official
# recipe's same-width body; 'remark': said in the tag's notes); jetmoe_timm.recycle builds them on first load, and
# the tags' pretrained cfgs come from this table (recycled_cfgs)
RECYCLED_FROM = {
    'v_jetmoe_tiny.recycled_in21k': dict(
        predecessor='vit_small_patch16_224.augreg_in21k', body_predecessor='vit_tiny_patch16_224.augreg_in21k'),
    'v_jetmoe_small.recycled_in21k': dict(
        predecessor='vit_base_patch16_224.augreg_in21k', body_predecessor='vit_small_patch16_224.augreg_in21k'),
    # DeiT-3 (layer scale, no position embedding on the class token): both converted exactly, see recycle/vit.py
    'v_jetmoe_tiny.recycled_deit3_in22k': dict(
        predecessor='deit3_small_patch16_224.fb_in22k_ft_in1k', remark='layer scale folded'),
    'v_jetmoe_small.recycled_deit3_in22k': dict(
        predecessor='deit3_base_patch16_224.fb_in22k_ft_in1k',
        body_predecessor='deit3_small_patch16_224.fb_in22k_ft_in1k', remark='layer scale folded'),
}

default_cfgs = generate_default_cfgs({
    **recycled_cfgs(_cfg, RECYCLED_FROM),  # first: each model's default tag is a recycled one
    'v_jetmoe_tiny.official_in1k': _cfg(
        hf_hub_id=f'{HF_ORG}/v_jetmoe_tiny.official_in1k',
        **OFFICIAL_DATA_CFG,
        notes=(
            'Official MoE Jetpack V-JetMoE-T fine-tuned on ImageNet-1k, converted from the MMPretrain '
            'checkpoint (paper: 79.9% top-1). Uses routing="official" (entmax15 combine).',
        ),
    ),
})


@register_model
def v_jetmoe_tiny(pretrained: bool = False, **kwargs) -> VisionTransformerJetMoE:
    """V-JetMoE-T: ViT-T/16 at 224 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11 (the later half)."""
    model_args = dict(
        patch_size=16, embed_dim=192, depth=12, num_heads=3, global_pool='avg',
        num_core_experts=98, num_univ_experts=196,
    )
    return _create_vit_jetmoe('v_jetmoe_tiny', pretrained=pretrained, model_args=model_args, **kwargs)


@register_model
def v_jetmoe_small(pretrained: bool = False, **kwargs) -> VisionTransformerJetMoE:
    """V-JetMoE-S: ViT-S/16 at 224 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11 (the later half)."""
    model_args = dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, global_pool='avg',
        num_core_experts=98, num_univ_experts=196,
    )
    return _create_vit_jetmoe('v_jetmoe_small', pretrained=pretrained, model_args=model_args, **kwargs)
