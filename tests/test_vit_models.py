"""timm conventions for every registered V-JetMoE model, on tiny configurations of the same code path."""
import math
import re

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from jetmoe_timm import routing_info, set_routing_capture
from jetmoe_timm.layers import SpheroMoE

VIT_MODELS = timm.list_models('v_jetmoe_*')


def test_registration_and_default_cfgs():
    assert set(VIT_MODELS) >= {'v_jetmoe_tiny', 'v_jetmoe_small'}
    assert 'v_jetmoe_tiny.recycled_in21k' in timm.list_models('*jetmoe*', pretrained=True)
    cfg = timm.models.get_pretrained_cfg('v_jetmoe_tiny')
    assert cfg.input_size == (3, 224, 224)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)  # the augreg predecessor's
    assert cfg.crop_pct == 0.9 and cfg.first_conv == 'patch_embed.proj' and cfg.classifier == 'head'
    assert cfg.license == 'apache-2.0' and cfg.paper_ids == 'arXiv:2406.04801'
    assert cfg.hf_hub_id == 'jetmoe-timm/v_jetmoe_tiny.recycled_in21k'
    assert cfg.num_classes == 0  # a recycled init has no classifier


# v_jetmoe_tiny: the official model, parameter for parameter
@pytest.mark.parametrize('name,expected', [('v_jetmoe_tiny', 265_411_636), ('v_jetmoe_small', 1_058_124_916)])
def test_full_size_parameter_counts(name, expected):
    model = timm.create_model(name, num_classes=1000, device='meta')
    assert sum(p.numel() for p in model.parameters()) == expected
    moe = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, SpheroMoE)]
    assert moe == [6, 7, 8, 9, 10, 11]
    layer = model.blocks[6].mlp
    assert (layer.num_core_experts, layer.num_univ_experts, layer.core_hidden) == (98, 196, 4 * model.embed_dim)
    assert layer.univ_hidden == layer.core_hidden // 4


@pytest.mark.parametrize('name', VIT_MODELS)
def test_forward_backward_every_parameter(name, tiny_vit_kwargs):
    model = timm.create_model(name, num_classes=42, drop_path_rate=0.1, moe_drop_rate=0.1, **tiny_vit_kwargs)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize('name', VIT_MODELS)
def test_features_head_and_classifier(name, tiny_vit_kwargs):
    model = timm.create_model(name, num_classes=5, **tiny_vit_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 65, 32)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model.global_pool == 'avg' and model(x).shape == (2, 32)  # pool kept
    model.reset_classifier(7, global_pool='token')
    assert model(x).shape == (2, 7)
    inter = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(inter) == 2 and inter[0].shape == (2, 32, 8, 8)


@pytest.mark.parametrize('name', VIT_MODELS)
def test_features_only(name, tiny_vit_kwargs):
    model = timm.create_model(name, features_only=True, out_indices=(1, 3), **tiny_vit_kwargs).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape for o in outs] == [(1, 32, 8, 8)] * 2
    assert model.feature_info.channels() == [32, 32]


def test_grad_checkpointing_same_output(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', num_classes=3, **tiny_vit_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_no_weight_decay_and_group_matcher(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', num_classes=3, **tiny_vit_kwargs)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert {'pos_embed', 'cls_token', 'blocks.2.mlp.temp_raw', 'blocks.3.mlp.temp_raw',
            'blocks.2.mlp.core_experts.fc1.bias', 'blocks.3.mlp.univ_experts.fc2.bias'} <= nwd
    assert 'blocks.3.mlp.core_experts.fc1.weight' not in nwd
    assert all(n in names for n in nwd if n not in ('reg_token', 'dist_token'))
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.6,
                                      no_weight_decay_list=nwd)
    scale = {}
    for g in groups:
        for p in g['params']:
            scale[p] = g['lr_scale']
    full = [n for n, p in names.items() if scale[p] == 1.0]
    # MoE slot queries, temperatures, experts and MoE norm2 at full lr, like the head
    for n in ('blocks.3.mlp.slot_query', 'blocks.3.mlp.temp_raw', 'blocks.2.mlp.core_experts.fc1.weight',
              'blocks.2.mlp.univ_experts.fc2.bias', 'blocks.2.mlp.slot_norm.weight', 'blocks.2.norm2.weight',
              'head.weight', 'fc_norm.weight'):
        assert n in full, n
    # everything else decays with depth
    assert scale[names['blocks.3.attn.qkv.weight']] == pytest.approx(0.6)
    assert scale[names['blocks.0.mlp.fc1.weight']] == pytest.approx(0.6 ** 4)
    assert scale[names['blocks.0.norm2.weight']] == pytest.approx(0.6 ** 4)
    assert scale[names['patch_embed.proj.weight']] == pytest.approx(0.6 ** 5)
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse['blocks.3.mlp.slot_query'] == coarse['blocks.2.norm2.weight'] == coarse['head.weight'] == 5
    assert (coarse['cls_token'], coarse['patch_embed.proj.weight'], coarse['blocks.0.mlp.fc1.weight'],
            coarse['blocks.3.attn.qkv.weight']) == (0, 0, 1, 4)


def test_device_dtype_and_unknown_kwargs(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', dtype=torch.float64, device='cpu', **tiny_vit_kwargs)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError):
        timm.create_model('v_jetmoe_tiny', not_a_model_arg=1, **tiny_vit_kwargs)
    with pytest.raises(ValueError, match='moe_blocks'):
        timm.create_model('v_jetmoe_tiny', moe_blocks=(9,), **tiny_vit_kwargs)


def test_table4_variant_kwargs(tiny_vit_kwargs):
    kw = dict(tiny_vit_kwargs, num_core_experts=2, num_univ_experts=3)
    model = timm.create_model('v_jetmoe_tiny', moe_blocks=(1, 3), slots_per_expert=2, univ_ratio=0.5,
                              routing='official', **kw)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, SpheroMoE)] == [1, 3]
    layer = model.blocks[1].mlp
    assert layer.num_slots == 10 and layer.univ_hidden == 64 and layer.combine == 'entmax15'
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # recycled cfg: no classifier


def test_fix_init_scales_the_experts_output_projections(tiny_vit_kwargs):
    """fix_init divides each block's output projections by sqrt(2 * layer id), as in timm's ViT: in a MoE block,
    its experts' fc2 (they kept their plain init, and init_weights() failed on the SpheroMoE's missing fc2)."""
    def build(fix_init):
        torch.manual_seed(0)
        return timm.create_model('v_jetmoe_tiny', fix_init=fix_init, **tiny_vit_kwargs)

    def check(plain, fixed):
        plain_sd, scaled = plain.state_dict(), []
        for name, w in fixed.state_dict().items():
            m = re.fullmatch(r'blocks\.(\d+)\.(?:attn\.proj|mlp\.(?:core_experts\.|univ_experts\.)?fc2)\.weight', name)
            torch.testing.assert_close(w, plain_sd[name] / math.sqrt(2 * (int(m[1]) + 1)) if m else plain_sd[name])
            scaled += [name] if m else []
        assert len(scaled) == 4 + 2 + 2 * 2  # attn.proj everywhere, dense fc2 in blocks 0-1, two expert groups in 2-3

    plain, fixed = build(False), build(True)
    check(plain, fixed)
    for model in (plain, fixed):
        torch.manual_seed(1)
        model.init_weights()
    check(plain, fixed)


@pytest.mark.parametrize('mode', ['', 'jax', 'jax_nlhb', 'moco'])
def test_weight_init_modes_reach_the_experts(tiny_vit_kwargs, mode):
    """timm's weight_init modes give the experts what they give a ViT MLP's nn.Linear (timm's own per-module init
    passes by the stacked expert weights): compared with the dense MLP of the same mode and shapes, at build and
    after init_weights(mode); fix_init then scales the expert fc2 as before."""
    kw = dict(tiny_vit_kwargs, mlp_ratio=8., num_classes=10)  # widths for a stable std; classes for jax_nlhb

    def expert_and_dense(model):
        core, dense = model.blocks[-1].mlp.core_experts, model.blocks[0].mlp  # block 0 stays dense
        return [(getattr(core, fc).weight.detach(), getattr(dense, fc).weight.detach()) for fc in ('fc1', 'fc2')] + \
            [(getattr(core, fc).bias.detach(), getattr(dense, fc).bias.detach()) for fc in ('fc1', 'fc2')]

    def check(model):
        for expert, dense in expert_and_dense(model):
            assert expert.std().item() == pytest.approx(dense.std().item(), rel=0.1, abs=1e-9)
            if mode.startswith(('jax', 'moco')) and expert.dim() == 3:  # xavier-uniform: the same bound
                assert expert.abs().max().item() == pytest.approx(dense.abs().max().item(), rel=0.05)

    torch.manual_seed(0)
    built = timm.create_model('v_jetmoe_tiny', weight_init=mode, **kw)
    check(built)
    jax_bias = built.blocks[-1].mlp.core_experts.fc1.bias
    assert (0 < jax_bias.std() < 1e-5) if mode.startswith('jax') else not jax_bias.any()
    later = timm.create_model('v_jetmoe_tiny', **kw)
    later.init_weights(mode)
    check(later)
    torch.manual_seed(0)
    fixed = timm.create_model('v_jetmoe_tiny', weight_init=mode, fix_init=True, **kw)
    i = len(fixed.blocks) - 1
    for group in ('core_experts', 'univ_experts'):
        w, w_plain = (getattr(m.blocks[i].mlp, group).fc2.weight for m in (fixed, built))
        torch.testing.assert_close(w, w_plain / math.sqrt(2 * (i + 1)))


def test_torchscript(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', num_classes=3, **tiny_vit_kwargs).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scripted(x), model(x))


def test_macs_are_the_matmuls_of_the_forward_pass():
    """count_macs counts every matmul of one image's forward pass, attention's included (timm's fused attention,
    which the counter does not see, is switched off), and the SpheroMoE layer's: routing logits, dispatch, each
    expert's two matmuls per slot, combine."""
    from jetmoe_timm.profile import count_macs
    d, h, p, img, classes = 32, 128, 8, 32, 10
    patches = (img // p) ** 2
    n = patches + 1  # the class token
    embed, head = patches * 3 * p * p * d, d * classes
    attention = n * 4 * d * d + 2 * n * n * d  # qkv and proj; q k^T and attn v
    dense = timm.create_model('vit_small_patch16_224', img_size=img, patch_size=p, embed_dim=d, depth=2,
                              num_heads=2, num_classes=classes)
    assert count_macs(dense, (3, img, img)) == embed + 2 * (attention + n * 2 * d * h) + head
    moe = timm.create_model('v_jetmoe_tiny', img_size=img, patch_size=p, embed_dim=d, depth=2, num_heads=2,
                            num_classes=classes, num_core_experts=2, num_univ_experts=4, moe_blocks=[1])
    layer = moe.blocks[1].mlp
    slots = layer.num_slots  # one per expert
    experts = 2 * 2 * d * layer.core_hidden + 4 * 2 * d * layer.univ_hidden
    routing = 3 * n * slots * d  # logits against the slot queries, dispatch, combine
    assert count_macs(moe, (3, img, img)) == embed + 2 * attention + n * 2 * d * h + routing + experts + head


def test_routing_inspection_api(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', num_classes=3, **tiny_vit_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert all(m.last_routing is None for m in model.modules() if isinstance(m, SpheroMoE))  # off: no cost
    set_routing_capture(model, True)
    model(x)
    info = routing_info(model)
    assert list(info) == ['blocks.2.mlp', 'blocks.3.mlp']
    r = info['blocks.2.mlp']
    assert r['dispatch'].shape == (2, 65, 12) and int(r['num_core_slots']) == 4
    torch.testing.assert_close(r['dispatch'].sum(1), torch.ones(2, 12))
    set_routing_capture(model, False)
    with pytest.raises(RuntimeError, match='set_routing_capture'):
        routing_info(model)
