""" What every JetMoE model shares, whatever its dense family: SpheroMoE layers built from one bundle of options,
and the timm hooks that treat those layers alike (``moe_layers``, ``no_weight_decay``, layer-decay grouping).

A family's model subclasses ``JetMoEMixin`` first and its timm model second, builds the dense model, then replaces the
MLPs of the blocks ``_resolve_moe_blocks`` chooses with ``_make_moe``; everything MoE-specific after that is here.
"""
import operator
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn

from ..layers import SpheroMoE
from ..routing import moe_layers
from ._pretrained import weight_shapes

__all__ = ['JetMoEMixin', 'MoEOptions']


@dataclass(frozen=True, kw_only=True)
class MoEOptions:
    """The SpheroMoE options a JetMoE model passes to every MoE layer (model kwargs of the same names; by keyword:
    nine options in a row are easy to swap)."""
    univ_ratio: float = 0.25
    slots_per_expert: int = 1
    routing: str = 'sphero'
    moe_combine: Optional[str] = None
    moe_noise_mult: Optional[float] = None
    moe_noise_at_eval: bool = False
    moe_drop_rate: float = 0.
    moe_drop_mode: str = 'element'
    moe_drop_path_rate: Optional[float] = None


def _blocks(shapes: Dict[str, tuple]) -> List[str]:
    """The block names of (timm-layout) tensor shapes, in model order: their index is the block's ``moe_blocks``
    index (over all stages for ConvNeXt)."""
    names = {'.'.join(k.split('.')[:k.split('.').index('blocks') + 2]) for k in shapes
             if '.blocks.' in k or k.startswith('blocks.')}
    return sorted(names, key=lambda b: [int(p) for p in b.split('.') if p.isdigit()])  # blocks.10 after blocks.9


def _moe_blocks(shapes: Dict[str, tuple]) -> List[int]:
    """The ``moe_blocks`` of (timm-layout) tensor shapes."""
    return [i for i, b in enumerate(_blocks(shapes)) if f'{b}.mlp.slot_query' in shapes]


def _stage_widths(shapes: Dict[str, tuple]) -> Dict[str, Any]:
    """Stage name -> its blocks' width (one stage for ViT), read off their norms, as the first conv is left to
    timm."""
    widths = {}
    for b in _blocks(shapes):
        norm = shapes.get(f'{b}.norm1.weight') or shapes.get(f'{b}.norm.weight') or ('?',)  # ViT's, ConvNeXt's
        widths.setdefault(b.rpartition('blocks.')[0], norm[0])
    return widths


def _describe(shapes: Dict[str, tuple]) -> str:
    """A model's layout in words, read off its (timm-layout) tensor shapes."""
    blocks = _blocks(shapes)
    moe = _moe_blocks(shapes)
    widths = _stage_widths(shapes)
    width = widths.popitem()[1] if len(widths) == 1 else tuple(widths.values())
    experts = next((shapes[f'{blocks[i]}.mlp.slot_query'][0] for i in moe), 0)
    return (f'a model of width {width} with {len(blocks)} blocks, MoE in blocks {moe}'
            + (f' ({experts} experts each)' if moe else '') if blocks else 'no JetMoE weights')


class JetMoEMixin:
    """Shared MoE behaviour of V-JetMoE and C-JetMoE (and any later family).

    Class attributes a family sets:
        moe_norm: name, inside a block, of the norm that feeds the MLP ('norm2' for ViT, 'norm' for ConvNeXt);
            it trains with the MoE layer under layer decay, as in the official recipe.
        dense_mlp_keys: suffixes of a dense MLP's weight keys, in every checkpoint layout the family's filter reads:
            a checkpoint with them and no SpheroMoE layer is called dense (recycle it first).
    """
    moe_norm: str = 'norm2'
    dense_mlp_keys: Tuple[str, ...] = ('.fc1.weight',)  # what a dense MLP's weights end with, in any layout read

    def _resolve_moe_blocks(self, moe_blocks, total: int, what: str = '') -> List[int]:
        """0-based MoE block indices, the later half by default, checked against ``total`` blocks. As timm's
        ``out_indices``: one int is one block, negative indices count from the end."""
        moe_blocks = range(total // 2, total) if moe_blocks is None else moe_blocks
        if not hasattr(moe_blocks, '__iter__'):
            moe_blocks = (moe_blocks,)  # --model-kwargs moe_blocks=11 gives an int
        try:
            if isinstance(moe_blocks, (str, bytes)):  # iterable, but of characters
                raise TypeError
            moe_blocks = [operator.index(i) for i in moe_blocks]  # ints of any kind (numpy's), not floats
        except TypeError:
            raise TypeError(f'moe_blocks takes block indices (ints), got {moe_blocks!r}.') from None
        if any(i < -total or i >= total for i in moe_blocks):
            raise ValueError(f'moe_blocks {list(moe_blocks)} must lie in {-total}..{total - 1} (block indices{what}, '
                             f'negative from the end).')
        return sorted({i % total for i in moe_blocks})

    def _make_moe(self, dim: int, index: int, total: int, options: MoEOptions, num_core_experts: int,
                  num_univ_experts: int, core_hidden: int, act_layer: Type[nn.Module], drop_path_rate: float,
                  **dd) -> SpheroMoE:
        """The SpheroMoE layer of block ``index`` (0-based over ``total`` blocks): the experts use the dense MLP's
        activation, and expert drop path follows the blocks' linear drop-path schedule."""
        peak = drop_path_rate if options.moe_drop_path_rate is None else options.moe_drop_path_rate
        return SpheroMoE(
            dim,
            num_core_experts=num_core_experts,
            num_univ_experts=num_univ_experts,
            core_hidden=core_hidden,
            univ_ratio=options.univ_ratio,
            slots_per_expert=options.slots_per_expert,
            routing=options.routing,
            combine=options.moe_combine,
            noise_mult=options.moe_noise_mult,
            noise_at_eval=options.moe_noise_at_eval,
            expert_drop=options.moe_drop_rate,
            expert_drop_mode=options.moe_drop_mode,
            expert_drop_path=peak * index / max(total - 1, 1),
            act_layer=act_layer,
            **dd,
        )

    def dense_layout(self) -> str:
        """The dense architecture in words, read off the model itself (not its registered default): the model
        card's 'a ViT with 12 blocks of width 192 ...'. Each family says its own; this is what a card says of a
        family that does not."""
        return f'a {type(self).__name__}'

    @torch.jit.ignore
    def moe_layers(self) -> Dict[str, SpheroMoE]:
        """{module name: SpheroMoE layer}, e.g. ``{'blocks.6.mlp': ...}``, in model order."""
        return moe_layers(self)

    @torch.jit.ignore
    def moe_block_names(self) -> List[str]:
        """Module names of the blocks holding a MoE layer, e.g. ``['blocks.6', ...]``; the layer is ``<name>.mlp``."""
        return [name.rsplit('.', 1)[0] for name in self.moe_layers()]

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """timm's, which drops the blocks after the last intermediate taken; ``moe_blocks`` then lists only the MoE
        blocks left."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        # only trailing blocks go and moe_blocks is sorted: the MoE layers left are its first ones
        self.moe_blocks = self.moe_blocks[:len(self.moe_layers())]
        return take_indices

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The family's own set, plus the MoE temperatures and expert biases: the biases are 2-D (E, out), so
        timm's no-decay rule for 1-D tensors misses them, and the official recipe decays no bias."""
        base = getattr(super(), 'no_weight_decay', None)
        names = set(base()) if base is not None else set()
        for name, moe in self.moe_layers().items():
            names.add(f'{name}.temp_raw')
            names.update(f'{name}.{path}_experts.{fc}.bias' for path in moe.expert_groups() for fc in ('fc1', 'fc2'))
        return names

    def filter_checkpoint(self, state_dict: Dict[str, torch.Tensor], timm_filter) -> Dict[str, torch.Tensor]:
        """``timm_filter(state_dict, self)`` (timm's layout conversions), then ``check_checkpoint``; a checkpoint
        timm cannot convert at all (a missing key, or a position embedding its resampling cannot reshape: another
        prefix-token layout) is described instead, when it is another model's."""
        try:
            converted = timm_filter(state_dict, self)
        except (KeyError, RuntimeError) as e:
            self.check_checkpoint(state_dict)
            pos, ours = state_dict.get('pos_embed'), getattr(self, 'pos_embed', None)
            if isinstance(e, RuntimeError) and pos is not None and ours is not None and pos.shape != ours.shape:
                raise ValueError(f"The checkpoint's pos_embed {tuple(pos.shape)} cannot be resampled to this model's "
                                 f"{tuple(ours.shape)}: it was made with other prefix tokens (class_token, reg_tokens, "
                                 f"no_embed_class). Create the model with the kwargs it was made with.") from None
            raise
        self.check_checkpoint(converted)
        return converted

    def check_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Refuse, in one message, a (timm-layout) checkpoint of another model: say what it holds and what this
        model is, instead of timm's dump of every mismatched key. The first conv and the classifier are left to
        timm, which adapts them (in_chans, num_classes)."""
        cfg = getattr(self, 'pretrained_cfg', None) or {}  # none on a model built without timm's factory
        skip = tuple(c for c in (cfg.get('first_conv'), cfg.get('classifier'), 'head') if c)
        ours, theirs = weight_shapes(self.state_dict(), skip), weight_shapes(state_dict, skip)
        bad = [k for k, s in ours.items() if theirs.get(k) != s]
        if len(bad) <= 3:  # a few keys: timm's strict load names them better than a summary would
            return
        dense = not any(k.endswith('.slot_query') for k in theirs) and any(k.endswith(self.dense_mlp_keys)
                                                                            for k in theirs)
        found = _moe_blocks(theirs)
        # its moe_blocks, where they differ, with whatever else it was made with: only the checkpoint knows whether
        # depth, widths or experts differ too (the two descriptions show what the tensors tell)
        kwargs = f'moe_blocks={found} and its other model kwargs' if found and found != self.moe_blocks else \
            'its model kwargs'  # found empty: no JetMoE checkpoint at all
        fix = ('It is a dense checkpoint: recycle it into this model first (jetmoe-timm convert MODEL --predecessor '
               'FILE --out DIR, or jetmoe_timm.convert), then load DIR.' if dense else
               f'Create the model the checkpoint was made for ({kwargs}), or pass the checkpoint of this one.')
        raise ValueError(f'The checkpoint holds {_describe(theirs)}; this {type(self).__name__} is '
                         f'{_describe(ours)} ({len(bad)} tensors differ, e.g. {bad[0]}). {fix}')

    def _moe_group_pattern(self) -> str:
        """Regex prefix of the parameters that train at full lr under layer decay: the MoE layers and the norm
        feeding each (the official recipe puts slot queries, temperatures, experts and that norm in the head's
        group)."""
        names = '|'.join(re.escape(n) for n in self.moe_block_names()) or 'none'
        return rf'(?:{names})\.(?:{self.moe_norm}|mlp)\.'
