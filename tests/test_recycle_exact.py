"""Recycling is exact where it can be: every ViT flavour timm ships, and ConvNeXt, into full-width successors.

A full-width dense successor selects every channel, head and neuron (a permutation at most), so it must compute
what the predecessor computes; full-width copy experts must compute the dense MLP on equal tokens (every slot
then holds that token, and the combine weights sum to one). Predecessors have random weights and random layer
scales, so an index or a scale that is dropped shows.
"""
import pytest
import timm
import torch
from timm.layers import SwiGLUPacked

from jetmoe_timm.recycle import recycle

BASE = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
VIT_FLAVOURS = {  # timm ViT flavours: what real checkpoints carry
    'augreg': dict(qkv_bias=True),
    'deit3_layer_scale': dict(init_values=1e-5, no_embed_class=True),
    'dinov2_patch14': dict(img_size=42, patch_size=14, init_values=1e-5),
    'dinov2_registers': dict(img_size=28, patch_size=14, init_values=1e-5, reg_tokens=4, no_embed_class=True),
    'no_class_token_avg_pool': dict(class_token=False, global_pool='avg', fc_norm=False),
    'qk_norm': dict(qk_norm=True, qkv_bias=False),
    'patch16_big_grid': dict(img_size=96, patch_size=16),
    'no_head': dict(num_classes=0),
    'clip_pre_norm': dict(pre_norm=True),
    'embed_norm': dict(embed_norm_layer='layernorm'),
    'no_final_norm': dict(final_norm=False, init_values=1e-5, reg_tokens=2, no_embed_class=True),  # C-RADIO-like
}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('gamma'):  # trained layer scales are far from their 1e-5 init, and differ per channel
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _vit(flavour):
    kwargs = dict(BASE, **VIT_FLAVOURS[flavour])
    pred = _randomize(timm.create_model('vit_small_patch16_224', **kwargs))
    return pred, dict(kwargs, global_pool=pred.global_pool)  # V-JetMoE pools by average unless told


def _succ(kwargs, **overrides):
    keys = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'num_classes', 'class_token',
            'global_pool', 'reg_tokens', 'no_embed_class', 'qk_norm', 'qkv_bias', 'fc_norm', 'pre_norm',
            'embed_norm_layer', 'final_norm')
    succ_kwargs = {k: v for k, v in kwargs.items() if k in keys}
    torch.manual_seed(1)
    return timm.create_model('v_jetmoe_tiny', **dict(succ_kwargs, **overrides))


def _recycled(succ, pred, method='importance'):
    r = recycle(succ, pred, method=method, num_calib=8, batch_size=4, progress=False)
    succ.load_state_dict(r.state_dict)
    return succ.eval(), r


@pytest.mark.parametrize('flavour, layer_scale', [(f, False) for f in VIT_FLAVOURS] + [
    (f, True) for f, kw in VIT_FLAVOURS.items() if 'init_values' in kw])  # successor without / with layer scale
def test_full_width_dense_successor_is_exact(flavour, layer_scale):
    pred, kwargs = _vit(flavour)
    succ = _succ(kwargs, moe_blocks=(), init_values=1e-5 if layer_scale else None)
    succ, r = _recycled(succ, pred)
    x = torch.randn(2, 3, kwargs['img_size'], kwargs['img_size'])
    with torch.no_grad():
        torch.testing.assert_close(succ(x), pred(x), atol=1e-4, rtol=1e-4)
        if kwargs['num_classes']:  # the whole head came along too
            assert 'head.weight' not in r.fresh_keys


def test_successor_layer_scale_without_predecessor_one_is_identity():
    """A successor built with init_values from a predecessor without layer scale gets gammas of one."""
    pred, kwargs = _vit('augreg')
    succ, _ = _recycled(_succ(kwargs, moe_blocks=(), init_values=1e-5), pred)
    assert torch.equal(succ.blocks[0].ls1.gamma, torch.ones(48))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(succ(x), pred(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('flavour', ['augreg', 'deit3_layer_scale', 'dinov2_registers', 'qk_norm'])
@pytest.mark.parametrize('univ', [2, 0], ids=['dual-path', 'core-only'])
def test_full_width_copy_experts_are_exact_on_equal_tokens(flavour, univ):
    pred, kwargs = _vit(flavour)
    succ = _succ(kwargs, moe_blocks=(1, 2), num_core_experts=3, num_univ_experts=univ, univ_ratio=1.0)
    succ, _ = _recycled(succ, pred, method='copy')
    for i in (1, 2):
        token = torch.randn(1, 1, 48)
        x = token.expand(2, 5, 48)  # equal tokens: attention returns v(token) for every query, slots equal it
        with torch.no_grad():
            torch.testing.assert_close(succ.blocks[i](x), pred.blocks[i](x), atol=1e-4, rtol=1e-4)
            # the MoE layer alone (with the layer scale a successor without one has folded in), on a single token
            # too: every expert is the dense MLP and the combine weights sum to one
            s, p = succ.blocks[i], pred.blocks[i]
            torch.testing.assert_close(s.ls2(s.mlp(token)), p.ls2(p.mlp(token)), atol=1e-4, rtol=1e-4)


def test_statistics_and_weights_at_the_successor_grid():
    """A successor at another resolution is recycled from the predecessor resampled to its grid: with full
    width it computes what the resampled predecessor computes, and statistics are taken at its own size."""
    pred, kwargs = _vit('dinov2_patch14')
    succ = _succ(kwargs, img_size=28, moe_blocks=())
    succ, r = _recycled(succ, pred)
    assert r.provenance['calibration'].endswith(':28x28') and r.provenance['calib_size'] == 'successor'
    resized = timm.create_model('vit_small_patch16_224', **dict(kwargs, img_size=28))
    resized.load_state_dict(pred.state_dict() | {'pos_embed': timm.layers.resample_abs_pos_embed(
        pred.pos_embed, new_size=(2, 2), old_size=(3, 3), num_prefix_tokens=1)})
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(succ(x), resized.eval()(x), atol=1e-4, rtol=1e-4)
    native = recycle(_succ(kwargs, img_size=28, moe_blocks=()), pred, calib_size='predecessor', num_calib=8,
                     batch_size=4, progress=False)
    assert native.provenance['calibration'].startswith('synthetic') and ':28x28' not in native.provenance['calibration']
    with pytest.raises(ValueError, match='calib_size'):
        recycle(succ, pred, calib_size='native', progress=False)


def test_retention_is_reported_and_tells_recycled_from_scratch():
    pred, kwargs = _vit('deit3_layer_scale')
    _, r = _recycled(_succ(kwargs, moe_blocks=()), pred)
    kept = r.provenance['retention']
    assert kept['images'] == 8 and kept['cka'] == pytest.approx(1.0, abs=1e-3)  # full width: the same features
    assert kept['cka_scratch'] < 0.99
    _, r = _recycled(_succ(kwargs, embed_dim=24, num_heads=3, num_core_experts=4, num_univ_experts=4), pred)
    assert 0 < r.provenance['retention']['cka'] <= 1
    # the predecessor's features recorded during the statistics pass are the ones a separate pass computes
    # (predecessor and successor sizes agree here, so both regimes see the same images)
    again = recycle(_succ(kwargs, embed_dim=24, num_heads=3, num_core_experts=4, num_univ_experts=4), pred,
                    calib_size='predecessor', num_calib=8, batch_size=4, progress=False)
    assert again.provenance['retention'] == pytest.approx(r.provenance['retention'], abs=1e-4)


@pytest.mark.parametrize('kwargs, match', [
    (dict(mlp_layer=SwiGLUPacked, mlp_ratio=2.0), 'GLU'),
    (dict(block_fn=timm.models.vision_transformer.ResPostBlock), 'pre-norm Block'),
    (dict(scale_mlp_norm=True), 'inner norm'),
    (dict(attn_layer='diff', num_heads=2), "predecessor attention is DiffAttention, not timm's multi-head Attention"),
])
def test_unrecyclable_vits_are_refused_in_one_line(kwargs, match):
    pred = timm.create_model('vit_small_patch16_224', **dict(BASE, **kwargs))
    with pytest.raises(ValueError, match=match) as e:
        recycle(_succ(BASE, moe_blocks=()), pred, calib='weights', progress=False)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('model, pred_kwargs, succ_kwargs, match', [
    # parts of the predecessor the successor has no place for: their computation would be silently lost
    ('vit_small_patch16_224', dict(qkv_bias=True), dict(qkv_bias=False), r'no place for 3 .*blocks\.0\.attn\.qkv\.bias'),
    ('vit_small_patch16_224', dict(qk_norm=True), {}, r'no place for 12 .*blocks\.0\.attn\.q_norm\.weight'),
    ('vit_small_patch16_224', dict(global_pool='map'), {}, r"pools with attention \(global_pool='map'"),
    # another function in the MLPs (CLIP's QuickGELU), and the fix named
    ('vit_small_patch16_224', dict(act_layer='quick_gelu'), {}, r"QuickGELU.*act_layer='quick_gelu'"),
    ('deit_small_distilled_patch16_224', {}, {}, 'distilled DeiT'),
    # each with the option that places it: CLIP's pre-norm, an embedding norm (either side), no final norm
    # (C-RADIO, InternViT), where the successor's own norm would have stayed freshly initialised
    ('vit_small_patch16_224', dict(pre_norm=True), {}, r'e\.g\. norm_pre\.weight.*build the successor with pre_norm=True'),
    ('vit_small_patch16_224', dict(embed_norm_layer='layernorm'), {}, r"with embed_norm_layer='layernorm'\.$"),
    ('vit_small_patch16_224', {}, dict(embed_norm_layer='layernorm'),
     r'predecessor has nothing for \(patch_embed\.norm\..*build it with embed_norm_layer=None\.$'),
    ('vit_small_patch16_224', dict(final_norm=False), {}, r'nothing for \(fc_norm\.weight.*with final_norm=False\.$'),
    ('vit_small_patch16_224', dict(global_pool='avg'), dict(final_norm=False),
     r'no place for 2 .*fc_norm\.weight.*with final_norm=True\.$'),
    ('vit_small_patch16_224', dict(final_norm=False), dict(global_pool='token'),
     r'nothing for \(norm\.weight.*build it with final_norm=False'),
])
def test_predecessor_parts_the_successor_would_lose_are_refused_before_statistics(model, pred_kwargs, succ_kwargs,
                                                                                   match):
    pred = timm.create_model(model, **dict(BASE, **pred_kwargs))
    calls = []
    with pytest.raises(ValueError, match=match) as e:  # calibration images are never drawn
        recycle(_succ(BASE, moe_blocks=(2,), num_core_experts=2, num_univ_experts=2, **succ_kwargs), pred,
                calib=_Counting(calls), num_calib=4, batch_size=2, progress=False)
    assert '\n' not in str(e.value) and not calls


def test_a_new_head_may_start_fresh_where_a_lost_norm_may_not():
    """What a successor adds as a new head (an attention pool, ConvNeXt's hidden head layer) starts fresh, as a new
    classifier does; a norm inside the recycled computation that the predecessor has not is refused (above)."""
    pred = timm.create_model('vit_small_patch16_224', **dict(BASE, num_classes=0))
    _, r = _recycled(_succ(BASE, moe_blocks=(), num_classes=0, global_pool='map'), pred)
    assert {k.split('.')[0] for k in r.fresh_keys} == {'attn_pool'}
    kwargs = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=5)
    _, r = _recycled(timm.create_model('c_jetmoe_femto', **kwargs, moe_blocks=(), head_hidden_size=24),
                     timm.create_model('convnext_tiny', **kwargs))
    assert sorted(r.fresh_keys) == ['head.fc.bias', 'head.fc.weight', 'head.pre_logits.fc.bias',
                                    'head.pre_logits.fc.weight']


class _Counting(torch.utils.data.Dataset):
    """Calibration images that record being read."""

    def __init__(self, calls):
        self.calls = calls

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.calls.append(i)
        return torch.randn(3, 32, 32)


def test_bias_free_predecessor_is_exact_in_a_successor_with_biases():
    """Checkpoints built without qkv / projection / MLP biases (e.g. ViT-B/16 MIIL in21k) into the default
    successor, which has them: the missing biases are zeros, so the function is the predecessor's."""
    kwargs = dict(BASE, qkv_bias=False, proj_bias=False)
    pred = _randomize(timm.create_model('vit_small_patch16_224', **kwargs))
    succ, r = _recycled(_succ(dict(BASE, global_pool='token'), moe_blocks=()), pred)
    assert succ.blocks[0].attn.qkv.bias is not None and not r.fresh_keys
    assert not succ.blocks[0].attn.qkv.bias.any() and not succ.blocks[1].mlp.fc1.bias.any()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(succ(x), pred(x), atol=1e-4, rtol=1e-4)


def test_rope_vit_is_refused():
    eva = timm.create_model('eva02_tiny_patch14_224', img_size=28, num_classes=0)
    with pytest.raises(ValueError, match='RoPE'):
        recycle(_succ(dict(BASE, img_size=28, patch_size=14), moe_blocks=()), eva, calib='weights', progress=False)


@pytest.mark.parametrize('pred_ls, succ_ls', [(1e-6, None), (1e-6, 1e-6), (None, 1e-6)],
                         ids=['gamma-folded', 'gamma-copied', 'gamma-ones'])
def test_convnext_full_width_is_exact_with_layer_scale(pred_ls, succ_ls):
    """Built through the entrypoints: create_model drops ls_init_value=None, which would give both a gamma."""
    kwargs = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=5)
    entrypoint = timm.models.model_entrypoint
    pred = _randomize(entrypoint('convnext_tiny')(**kwargs, ls_init_value=pred_ls))
    torch.manual_seed(1)
    succ = entrypoint('c_jetmoe_femto')(**kwargs, moe_blocks=(), ls_init_value=succ_ls)
    assert [(m.stages[0].blocks[0].gamma is None) for m in (pred, succ)] == [pred_ls is None, succ_ls is None]
    succ, _ = _recycled(succ, pred)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(succ(x), pred(x), atol=1e-4, rtol=1e-4)


def test_convnext_v2_grn_is_refused_and_a_head_hidden_layer_travels():
    kwargs = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=5)
    v2 = timm.create_model('convnextv2_atto', **kwargs, conv_mlp=False)
    with pytest.raises(ValueError, match='global response norm') as e:
        recycle(timm.create_model('c_jetmoe_femto', **kwargs), v2, calib='weights', progress=False)
    assert '\n' not in str(e.value)
    # convnext_*_mlp checkpoints: the classifier reads a hidden layer (head_hidden_size)
    pred = _randomize(timm.create_model('convnext_tiny', **kwargs, head_hidden_size=24))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    same, r = _recycled(timm.create_model('c_jetmoe_femto', **kwargs, moe_blocks=(), head_hidden_size=24), pred)
    assert not r.fresh_keys
    headless, r = _recycled(timm.create_model('c_jetmoe_femto', **dict(kwargs, num_classes=0), moe_blocks=(),
                                              head_hidden_size=24), pred)
    assert not r.fresh_keys  # without a classifier the hidden layer's output is the feature: it comes along
    without, r = _recycled(timm.create_model('c_jetmoe_femto', **kwargs, moe_blocks=()), pred)
    assert sorted(r.fresh_keys) == ['head.fc.bias', 'head.fc.weight']  # not reused on another input
    with torch.no_grad():
        torch.testing.assert_close(same(x), pred(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(headless(x), pred.forward_head(pred.forward_features(x), pre_logits=True),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(without.forward_head(without.forward_features(x), pre_logits=True),
                                   pred.head.flatten(pred.head.norm(pred.head.global_pool(pred.forward_features(x)))),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('pred_flavour, succ_no_embed_class', [('deit3_layer_scale', False), ('augreg', True),
                                                                ('dinov2_registers', False)])
def test_prefix_position_embedding_convention_is_converted_exactly(pred_flavour, succ_no_embed_class):
    """DeiT-3 / DINOv2-reg predecessors (no position embedding on class / register tokens) into the default
    successor (with one), and the other way round: still the predecessor's function at full width."""
    pred, kwargs = _vit(pred_flavour)
    assert pred.no_embed_class != succ_no_embed_class
    succ, _ = _recycled(_succ(kwargs, moe_blocks=(), no_embed_class=succ_no_embed_class), pred)
    x = torch.randn(2, 3, kwargs['img_size'], kwargs['img_size'])
    with torch.no_grad():
        torch.testing.assert_close(succ(x), pred(x), atol=1e-4, rtol=1e-4)
    assert pred.no_embed_class != succ_no_embed_class  # the predecessor itself was not changed


def test_official_recipe_takes_head_and_norm_from_the_body_and_refuses_layer_scale():
    """The official recipe copies body, final norm and head from the same-width body predecessor: they are
    checked against it (a headless body leaves the head fresh), and a layer-scale successor is refused."""
    pred, kwargs = _vit('augreg')
    torch.manual_seed(3)
    body = _randomize(timm.create_model('vit_small_patch16_224', **dict(kwargs, embed_dim=24, num_classes=0)))
    succ = _succ(kwargs, embed_dim=24, num_heads=3, num_core_experts=2, num_univ_experts=2)
    r = recycle(succ, pred, recipe='official', body_predecessor=body, calib='weights', progress=False)
    assert 'head.weight' in r.fresh_keys and torch.equal(r.state_dict['norm.weight'], body.norm.weight)
    with pytest.raises(ValueError, match="recipe 'official'.*layer scale") as e:
        recycle(_succ(kwargs, embed_dim=24, num_heads=3, init_values=1e-5), pred, recipe='official',
                body_predecessor=body, calib='weights', progress=False)
    assert '\n' not in str(e.value)


def test_convnext_built_directly_and_tensor_calibration_at_its_own_size():
    """A ConvNeXt successor takes any input size: one built without timm's factory (no pretrained_cfg) recycles,
    and ready tensors are used at their own size, not blown up to the cfg's 224 px."""
    from jetmoe_timm import ConvNeXtJetMoE
    from jetmoe_timm.recycle.calibration import calibration_batches
    kwargs = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), num_classes=5)
    pred = _randomize(timm.create_model('convnext_tiny', **kwargs))
    succ = ConvNeXtJetMoE(**kwargs, num_core_experts=2, num_univ_experts=2)
    data = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32))
    r = recycle(succ, pred, calib=data, num_calib=6, batch_size=3, progress=False)
    assert r.provenance['retention']['images'] == 6
    batches, _, _ = calibration_batches(data, pred, num_images=6, batch_size=3)
    assert next(iter(batches)).shape == (3, 3, 32, 32)
