"""Recycling a timm ConvNeXt into C-JetMoE: the same engine as ViT, checked index by index."""
import pytest
import timm
import torch
from timm.models import save_for_hf

from jetmoe_timm.recycle import METHODS, recycle

PRED = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=10)
SUCC = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=4, num_univ_experts=6, num_classes=10)


@pytest.fixture(scope='module')
def predecessor():
    torch.manual_seed(0)
    model = timm.create_model('convnext_tiny', **PRED)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _recycle(pred, method='importance', **kwargs):
    torch.manual_seed(1)
    succ = timm.create_model('c_jetmoe_femto', **dict(SUCC, **kwargs))
    r = recycle(succ, pred, method=method, num_calib=8, batch_size=4, progress=False)
    assert r.model is succ and all(r.state_dict[k].data_ptr() == v.data_ptr() for k, v in succ.state_dict().items())
    return succ, r


@pytest.mark.parametrize('method', METHODS)
def test_recycled_weights_are_the_predecessors(predecessor, method):
    succ, r = _recycle(predecessor, method)
    P, S, sel = predecessor.state_dict(), succ.state_dict(), r.selection
    ch = [sel[f'stage{s}.channels'] for s in range(4)]
    assert [c.numel() for c in ch] == [8, 16, 24, 32]
    assert torch.equal(S['stem.0.weight'], P['stem.0.weight'][ch[0]])
    assert torch.equal(S['stem.1.weight'], P['stem.1.weight'][ch[0]])
    for s in (1, 2, 3):
        d = f'stages.{s}.downsample'
        assert torch.equal(S[f'{d}.0.weight'], P[f'{d}.0.weight'][ch[s - 1]])  # consistent across the boundary
        assert torch.equal(S[f'{d}.1.weight'], P[f'{d}.1.weight'][ch[s]][:, ch[s - 1]])
    for name in ('stages.0.blocks.0', 'stages.2.blocks.1', 'stages.3.blocks.0'):
        s = int(name.split('.')[1])
        for key in ('conv_dw.weight', 'conv_dw.bias', 'norm.weight', 'gamma'):
            assert torch.equal(S[f'{name}.{key}'], P[f'{name}.{key}'][ch[s]]), (name, key)
    assert torch.equal(S['stages.1.blocks.0.mlp.fc1.weight'],
                       P['stages.1.blocks.0.mlp.fc1.weight'][sel['stages.1.blocks.0.mlp']][:, ch[1]])
    name = 'stages.2.blocks.1'  # a MoE block (the later half: global blocks 2..4)
    for path in ('core', 'univ'):
        neurons = sel[f'{name}.{path}_neurons']
        assert all(row.unique().numel() == row.numel() for row in neurons)
        for e in range(neurons.shape[0]):
            n = neurons[e]
            assert torch.equal(S[f'{name}.mlp.{path}_experts.fc1.weight'][e], P[f'{name}.mlp.fc1.weight'][n][:, ch[2]].t())
            assert torch.equal(S[f'{name}.mlp.{path}_experts.fc2.weight'][e], P[f'{name}.mlp.fc2.weight'][ch[2]][:, n].t())
            assert torch.equal(S[f'{name}.mlp.{path}_experts.fc2.bias'][e], P[f'{name}.mlp.fc2.bias'][ch[2]])
    assert torch.equal(S['head.fc.weight'], P['head.fc.weight'][:, ch[3]])  # same classes and pooling


def test_classifier_of_another_pooling_is_not_taken(predecessor):
    """Same classes, but the successor pools otherwise: the predecessor's classifier read max-pooled features, so
    the successor's stays fresh (as for ViT), where with the same pooling it is taken."""
    succ, r = _recycle(predecessor, global_pool='max')
    taken = predecessor.head.fc.weight[:, r.selection['stage3.channels']]
    assert 'head.fc.weight' in r.fresh_keys and not torch.equal(succ.head.fc.weight, taken)
    assert 'head.fc.weight' not in _recycle(predecessor)[1].fresh_keys


@pytest.mark.parametrize('pred_kwargs, succ_kwargs, match', [
    (dict(head_norm_first=True), {}, r'nothing for \(head\.norm\..*build it with head_norm_first=True\.$'),
    ({}, dict(head_norm_first=True), r'nothing for \(norm_pre\..*build it with head_norm_first=False\.$'),
    (dict(conv_bias=True), dict(conv_bias=False), r'no place for .*stem\.0\.bias.*with conv_bias=True\.$'),
    # other kernels, wider experts: said before any statistics (a shape error in the plan, after them)
    (dict(kernel_sizes=5), {}, r'depthwise kernels differ: build the successor with kernel_sizes=\[5, 5, 5, 5\]\.$'),
    ({}, dict(core_mlp_ratio=16.), r'MLP of 192: build the successor with MLPs of at most 192 \(mlp_ratio; .*'
                                   r'core_mlp_ratio for C-JetMoE\)$'),
])
def test_layers_only_one_side_has_are_refused_naming_the_option(pred_kwargs, succ_kwargs, match):
    """A norm or bias only the predecessor has would be lost, one only the successor has would stay freshly
    initialised inside the recycled computation: both refused, naming the option that fixes it."""
    pred = timm.create_model('convnext_tiny', **dict(PRED, **pred_kwargs))
    succ = timm.create_model('c_jetmoe_femto', **dict(SUCC, **succ_kwargs))
    with pytest.raises(ValueError, match=match):
        recycle(succ, pred, calib='weights', progress=False)


def test_graph_recycling_is_deterministic(predecessor):
    # (full-width exactness: tests/test_recycle_exact.py)
    _, a = _recycle(predecessor, 'graph')
    _, b = _recycle(predecessor, 'graph')
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_stage0_downsample_and_stems():
    """patch_size 2 gives stage 0 a downsample, which reads the stem's output: a full-width successor reproduces
    the predecessor; an overlap stem (more layers, other widths) is refused in one line."""
    torch.manual_seed(0)
    pred = timm.create_model('convnext_tiny', **dict(PRED, patch_size=2)).eval()
    succ, _ = _recycle(pred, dims=PRED['dims'], moe_blocks=(), patch_size=2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(succ.eval()(x), pred(x), atol=1e-5, rtol=1e-5)
    overlap = timm.create_model('convnext_tiny', **dict(PRED, stem_type='overlap')).eval()
    with pytest.raises(ValueError, match="the predecessor has a stem of 3 layers \\(stem_type='overlap'\\)"):
        _recycle(overlap)


def test_wrong_family_and_recipe(predecessor, tmp_path):
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, num_classes=10)
    succ = timm.create_model('c_jetmoe_femto', **SUCC)
    with pytest.raises(ValueError, match='ConvNeXt predecessor'):
        recycle(succ, vit, progress=False)
    vit_succ = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                 num_core_experts=2, num_univ_experts=2)
    with pytest.raises(ValueError, match='VisionTransformer predecessor'):
        recycle(vit_succ, predecessor, progress=False)
    with pytest.raises(ValueError, match='exceeds the predecessor width'):
        recycle(timm.create_model('c_jetmoe_femto', **dict(SUCC, dims=(32, 32, 48, 64))), predecessor, progress=False)
    # timm's conv_mlp ConvNeXts (atto..nano) as a bare file: read as such, refused for what they are, in one line
    from safetensors.torch import save_file
    from jetmoe_timm.recycle import build_recycled
    atto = timm.create_model('convnext_tiny', depths=(2, 2, 2, 2), dims=(16, 32, 48, 64), conv_mlp=True)
    save_file({k: v.contiguous() for k, v in atto.state_dict().items()}, tmp_path / 'atto.safetensors')
    with pytest.raises(ValueError, match=r"^the predecessor keeps its MLPs as 1x1 convolutions \(conv_mlp=True: "
                                         r"timm's convnext_atto to convnext_nano\), which are not recycled: pass a "
                                         r"ConvNeXt with Linear MLPs"):
        build_recycled('c_jetmoe_femto', dict(SUCC, num_classes=0), predecessor=str(tmp_path / 'atto.safetensors'),
                       calib='weights', progress=False)
    with pytest.raises(ValueError, match="recipe 'official'"):
        recycle(succ, predecessor, recipe='official', body_predecessor=predecessor, calib='weights', progress=False)


def test_build_on_first_load(predecessor, tmp_path, monkeypatch):
    save_for_hf(predecessor, tmp_path / 'pred', safe_serialization=True)
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{tmp_path / "pred"}')
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '4')
    kw = dict(SUCC, num_classes=3)
    a = timm.create_model('c_jetmoe_femto', pretrained=True, **kw)
    files = list((tmp_path / 'cache' / 'c_jetmoe_femto.recycled_in22k').glob('*.safetensors'))
    assert len(files) == 1
    arch = {k: v for k, v in SUCC.items() if k != 'num_classes'}  # features_only loads without a head
    b = timm.create_model('c_jetmoe_femto', pretrained=True, features_only=True, **arch)
    assert torch.equal(a.stages[2].blocks[1].mlp.core_experts.fc1.weight,
                       b.stages_2.blocks[1].mlp.core_experts.fc1.weight)
    assert len(list((tmp_path / 'cache').rglob('*.safetensors'))) == 1  # the second load used the cache
