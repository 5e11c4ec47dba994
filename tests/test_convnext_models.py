"""timm conventions for every registered C-JetMoE model, on tiny configurations of the same code path."""
import re

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.optim import param_groups_layer_decay

from jetmoe_timm import ConvNeXtJetMoE, routing_info, set_routing_capture
from jetmoe_timm.layers import SpheroMoE
from jetmoe_timm.models.convnext_jetmoe import checkpoint_filter_fn

CONVNEXT_MODELS = timm.list_models('c_jetmoe_*')

# 5 blocks: the default later half puts MoE in blocks 2, 3, 4 = stages.2.blocks.{0,1} and stages.3.blocks.0
TINY_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=2, num_univ_experts=4)
MOE_NAMES = ['stages.2.blocks.0', 'stages.2.blocks.1', 'stages.3.blocks.0']


def _moe_names(model):
    return [n[:-len('.mlp')] for n, m in model.named_modules() if isinstance(m, SpheroMoE)]


def test_registration_and_default_cfgs():
    assert set(CONVNEXT_MODELS) >= {'c_jetmoe_femto', 'c_jetmoe_tiny'}
    pretrained = timm.list_models('c_jetmoe_*', pretrained=True)
    assert {'c_jetmoe_femto.recycled_in22k', 'c_jetmoe_tiny.recycled_in22k'} <= set(pretrained)
    cfg = timm.models.get_pretrained_cfg('c_jetmoe_femto')
    assert cfg.tag == 'recycled_in22k' and cfg.hf_hub_id == 'jetmoe-timm/c_jetmoe_femto.recycled_in22k'
    assert cfg.input_size == (3, 224, 224) and cfg.pool_size == (7, 7) and cfg.crop_pct == 0.875
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert cfg.first_conv == 'stem.0' and cfg.classifier == 'head.fc' and not cfg.fixed_input_size
    assert cfg.license == 'apache-2.0' and cfg.paper_ids == 'arXiv:2406.04801'
    assert cfg.num_classes == 0  # a recycled init has no classifier
    assert 'convnext_tiny.fb_in22k' in cfg.notes[0]
    assert timm.models.get_pretrained_cfg('c_jetmoe_tiny').hf_hub_id == 'jetmoe-timm/c_jetmoe_tiny.recycled_in22k'


@pytest.mark.parametrize('name,expected', [('c_jetmoe_femto', 391_323_946), ('c_jetmoe_tiny', 1_560_772_186)])
def test_full_size_parameter_counts(name, expected):
    model = timm.create_model(name, num_classes=1000, device='meta')
    assert sum(p.numel() for p in model.parameters()) == expected
    # blocks 10..18 of 18 (1-based): the last 6 of stage 3 and all of stage 4
    expected_moe = [f'stages.2.blocks.{b}' for b in range(3, 9)] + [f'stages.3.blocks.{b}' for b in range(3)]
    assert _moe_names(model) == expected_moe == model.moe_block_names()
    assert model.moe_blocks == list(range(9, 18))
    assert isinstance(model.stages[2].blocks[2].mlp, Mlp)
    for s, (core, univ) in ((2, (98, 196)), (3, (24, 48))):
        layer = model.stages[s].blocks[-1].mlp
        dim = model.feature_info[s]['num_chs']
        assert (layer.num_core_experts, layer.num_univ_experts, layer.core_hidden) == (core, univ, 4 * dim)
        assert layer.univ_hidden == layer.core_hidden // 4
    assert model.feature_info[3]['num_chs'] == (384 if name == 'c_jetmoe_femto' else 768)


def test_keys_match_timm_convnext_outside_the_moe():
    """A recycling engine maps timm ConvNeXt keys one to one, except the MLPs of the MoE blocks."""
    model = timm.create_model('c_jetmoe_femto', num_classes=1000, device='meta')
    dense = timm.create_model('convnext_tiny', dims=(48, 96, 192, 384), device='meta')
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in dense.state_dict().items()}
    moe_mlps = tuple(f'{n}.mlp.' for n in model.moe_block_names())
    assert {k: v for k, v in ours.items() if not k.startswith(moe_mlps)} == \
           {k: v for k, v in theirs.items() if not k.startswith(moe_mlps)}
    assert f'{moe_mlps[0]}fc1.weight' in theirs and f'{moe_mlps[0]}slot_query' in ours


def test_no_moe_blocks_is_timm_convnext():
    dense = timm.create_model('convnext_tiny', depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=5).eval()
    model = timm.create_model('c_jetmoe_femto', moe_blocks=(), num_classes=5, **TINY_CONVNEXT).eval()
    model.load_state_dict(dense.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), dense(x))


@pytest.mark.parametrize('name', CONVNEXT_MODELS)
def test_forward_backward_every_parameter(name):
    model = timm.create_model(name, num_classes=42, drop_path_rate=0.1, moe_drop_rate=0.1, **TINY_CONVNEXT)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert _moe_names(model) == MOE_NAMES
    assert model.stages[3].blocks[0].mlp.expert_drop_path == pytest.approx(0.1)  # the block schedule's peak


@pytest.mark.parametrize('name', CONVNEXT_MODELS)
def test_features_head_and_classifier(name):
    model = timm.create_model(name, num_classes=5, **TINY_CONVNEXT).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, 1, 1)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)  # pool kept
    model.reset_classifier(0, '')
    assert model(x).shape == (2, 32, 1, 1)
    model.reset_classifier(7, global_pool='avg')
    assert model(x).shape == (2, 7)
    inter = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape for t in inter] == [(2, 24, 2, 2), (2, 32, 1, 1)]


@pytest.mark.parametrize('name', CONVNEXT_MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True, **TINY_CONVNEXT).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    info = model.feature_info
    assert info.channels() == [8, 16, 24, 32] and info.reduction() == [4, 8, 16, 32]
    assert [o.shape for o in outs] == [(1, c, 64 // r, 64 // r) for c, r in zip(info.channels(), info.reduction())]
    model = timm.create_model(name, features_only=True, out_indices=(2, 3), **TINY_CONVNEXT)
    assert [o.shape[1] for o in model(torch.randn(1, 3, 32, 32))] == [24, 32]


def test_grad_checkpointing_same_output():
    model = timm.create_model('c_jetmoe_femto', num_classes=3, **TINY_CONVNEXT).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    torch.testing.assert_close(model(x), ref)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_no_weight_decay_and_group_matcher():
    model = timm.create_model('c_jetmoe_femto', num_classes=3, **TINY_CONVNEXT)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    expert_biases = {f'{n}.mlp.{path}.{fc}.bias' for n in MOE_NAMES for path in ('core_experts', 'univ_experts')
                     for fc in ('fc1', 'fc2')}
    assert nwd == {f'{n}.mlp.temp_raw' for n in MOE_NAMES} | expert_biases and nwd <= set(names)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.6, no_weight_decay_list=nwd)
    scale, decay = {}, {}
    for g in groups:
        for p in g['params']:
            scale[p], decay[p] = g['lr_scale'], g['weight_decay']
    full = [n for n, p in names.items() if scale[p] == 1.0]
    # MoE slot queries, temperatures, experts and the norm feeding them at full lr, like the head
    for n in ('stages.2.blocks.0.mlp.slot_query', 'stages.3.blocks.0.mlp.temp_raw',
              'stages.2.blocks.1.mlp.core_experts.fc1.weight', 'stages.2.blocks.0.mlp.univ_experts.fc2.bias',
              'stages.2.blocks.0.mlp.slot_norm.weight', 'stages.2.blocks.0.norm.weight',
              'stages.3.blocks.0.norm.bias', 'head.fc.weight', 'head.norm.weight'):
        assert n in full, n
    assert decay[names['stages.2.blocks.0.mlp.temp_raw']] == 0.
    assert decay[names['stages.2.blocks.0.mlp.core_experts.fc1.weight']] == 0.05
    # everything else decays with depth: stem, 5 blocks (stage downsample with its first block), head
    assert scale[names['stages.3.blocks.0.conv_dw.weight']] == pytest.approx(0.6)
    assert scale[names['stages.3.blocks.0.gamma']] == pytest.approx(0.6)
    assert scale[names['stages.3.downsample.1.weight']] == pytest.approx(0.6)
    assert scale[names['stages.2.blocks.0.conv_dw.weight']] == pytest.approx(0.6 ** 3)
    assert scale[names['stages.1.blocks.0.mlp.fc1.weight']] == pytest.approx(0.6 ** 4)
    assert scale[names['stages.0.blocks.0.norm.weight']] == pytest.approx(0.6 ** 5)
    assert scale[names['stem.0.weight']] == pytest.approx(0.6 ** 6)
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse['stages.2.blocks.0.mlp.slot_query'] == coarse['head.fc.weight'] == max(coarse.values())
    assert coarse['stages.2.blocks.0.conv_dw.weight'] == coarse['stages.2.downsample.1.weight'] == 3


def test_device_dtype_and_bad_kwargs():
    model = timm.create_model('c_jetmoe_femto', dtype=torch.float64, device='cpu', **TINY_CONVNEXT)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError):
        timm.create_model('c_jetmoe_femto', not_a_model_arg=1, **TINY_CONVNEXT)
    with pytest.raises(ValueError, match='moe_blocks'):
        timm.create_model('c_jetmoe_femto', moe_blocks=(5,), **TINY_CONVNEXT)
    with pytest.raises(ValueError, match='conv_mlp=False'):
        timm.create_model('c_jetmoe_femto', conv_mlp=True, **TINY_CONVNEXT)
    with pytest.raises(ValueError, match='num_core_experts needs one value per stage'):
        timm.create_model('c_jetmoe_femto', **dict(TINY_CONVNEXT, num_core_experts=(2, 2)))


def test_variant_kwargs():
    kw = dict(TINY_CONVNEXT, num_core_experts=(3, 1, 2, 2), num_univ_experts=(0, 5, 4, 4))
    model = timm.create_model('c_jetmoe_femto', moe_blocks=(0, 4), slots_per_expert=2, univ_ratio=0.5,
                              routing='official', **kw)
    assert _moe_names(model) == ['stages.0.blocks.0', 'stages.3.blocks.0']
    first, last = model.stages[0].blocks[0].mlp, model.stages[3].blocks[0].mlp
    assert (first.num_experts, first.univ_experts, first.core_hidden) == (3, None, 32)
    assert last.num_slots == 12 and last.univ_hidden == 64 and last.combine == 'entmax15'
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # recycled cfg: no classifier
    softmoe = timm.create_model('c_jetmoe_femto', routing='softmoe', **dict(TINY_CONVNEXT, num_univ_experts=0))
    assert softmoe.stages[2].blocks[0].mlp.temp_raw.shape == (1,)


def test_checkpoint_filter_and_pretrained_load():
    src = timm.create_model('c_jetmoe_femto', **TINY_CONVNEXT)
    sd = src.state_dict()
    model = timm.create_model('c_jetmoe_femto', pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd),
                              **TINY_CONVNEXT)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), src.eval()(x))
    assert checkpoint_filter_fn({'model': sd}, model).keys() == sd.keys()  # unwraps training checkpoints
    dense = timm.create_model('convnext_tiny', depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_classes=0)
    with pytest.raises(ValueError, match=r'It is a dense checkpoint: recycle it into this model first \(jetmoe-timm '
                                         r'convert MODEL --predecessor FILE --out DIR, or jetmoe_timm.convert\)'):
        checkpoint_filter_fn(dense.state_dict(), model)
    fb = dense.state_dict()
    for timm_key, fb_key in ((r'^stem\.', 'downsample_layers.0.'), (r'\.blocks\.', '.'), ('conv_dw', 'dwconv'),
                             (r'stages\.(\d+)\.downsample\.', r'downsample_layers.\1.'), (r'mlp\.fc', 'pwconv'),
                             (r'^head\.', '')):
        fb = {re.sub(timm_key, fb_key, k): v for k, v in fb.items()}  # the FB layout timm's filter maps back
    with pytest.raises(ValueError, match='It is a dense checkpoint: recycle it into this model first'):
        checkpoint_filter_fn(fb, model)


def test_torchscript():
    model = timm.create_model('c_jetmoe_femto', num_classes=3, **TINY_CONVNEXT).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))


def test_routing_inspection_on_spatial_tokens():
    model = timm.create_model('c_jetmoe_femto', num_classes=3, **TINY_CONVNEXT).eval()
    set_routing_capture(model, True)
    model(torch.randn(2, 3, 32, 32))
    info = routing_info(model)
    assert list(info) == [f'{n}.mlp' for n in MOE_NAMES]
    assert info['stages.2.blocks.0.mlp']['dispatch'].shape == (2, 4, 6)  # 2x2 positions, 6 slots
    assert info['stages.3.blocks.0.mlp']['combine'].shape == (2, 1, 6)


def test_exported_class():
    assert isinstance(timm.create_model('c_jetmoe_tiny', device='meta'), ConvNeXtJetMoE)
