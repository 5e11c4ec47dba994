"""Official MoE Jetpack checkpoints in the timm models: key layout, layer equations, every loading path.

The official layout and equations are written out here from the official code's facts (key names, shapes,
(E, out, in) expert weights, 0-d temperature scalars, l2norm / LayerNorm / softmax / entmax15 / dropout / drop
path order), independently of ``jetmoe_timm.official``, so that the library is checked against them.
"""
import copy
import hashlib
import json
import logging
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN

from jetmoe_timm.export import read_provenance
from jetmoe_timm.layers import SpheroMoE, entmax15
from jetmoe_timm.models import VisionTransformerJetMoE
from jetmoe_timm.models.vit_jetmoe import checkpoint_filter_fn
from jetmoe_timm.official import (
    convert_official_checkpoint, is_official_state_dict, official_to_timm, timm_to_official)

FULL = dict(embed_dim=192, depth=12, patch=16, img=224, num_classes=1000, moe_blocks=range(6, 12), core=98, univ=196)


def official_state_dict(embed_dim, depth, patch, img, num_classes, moe_blocks, core, univ, slots=1,
                        univ_factor=0.25, seed=0, device=None):
    """A state dict in the official ``vit_tiny_moe_custom`` layout, random values of sensible scale (float32).

    Matrices ~ U with variance 1/fan_in, so activations stay O(1); temperatures in [0.2, 0.8]. Each tensor is
    a random window of one shared pool of uniform numbers: as random per tensor, and fast at full size.
    """
    g = torch.Generator().manual_seed(seed)
    d, h, hu = embed_dim, 4 * embed_dim, int(4 * univ_factor * embed_dim)
    pool = None if device == 'meta' else torch.rand(1 << 24, generator=g) * (2 * math.sqrt(3)) - math.sqrt(3)

    def rand(*shape, scale=1., offset=0.):  # mean `offset`, std `scale`
        if pool is None:
            return torch.empty(shape, device='meta')
        n = math.prod(shape)
        start = int(torch.randint(0, pool.numel() - n + 1, (), generator=g))
        return (pool[start:start + n] * scale + offset).view(shape)

    def linear(name, out_f, in_f):
        return {f'{name}.weight': rand(out_f, in_f, scale=in_f ** -0.5), f'{name}.bias': rand(out_f, scale=0.1)}

    def norm(name):
        return {f'{name}.weight': rand(d, scale=0.1, offset=1.), f'{name}.bias': rand(d, scale=0.1)}

    sd = {
        'cls_token': rand(1, 1, d, scale=0.02),
        'pos_embed': rand(1, (img // patch) ** 2 + 1, d, scale=0.02),
        'patch_embed.proj.weight': rand(d, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        'patch_embed.proj.bias': rand(d, scale=0.1),
    }
    for i in range(depth):
        p = f'blocks.{i}.'
        sd.update(norm(p + 'norm1'))
        sd.update(linear(p + 'attn.qkv', 3 * d, d))
        sd.update(linear(p + 'attn.proj', d, d))
        sd.update(norm(p + 'norm2'))
        if i in moe_blocks:
            sd[p + 'mlp.phi'] = rand(core + univ, slots, d)
            for j in (0, 1):  # nn.Parameter(torch.tensor(0.5)): 0-d
                sd[p + f'mlp.scales.{j}'] = rand(scale=0.3 / math.sqrt(3), offset=0.5).reshape(())
            sd.update({p + 'mlp.slot_norm.' + k: v for k, v in norm('x').items() for k in [k[2:]]})
            for group, n, hidden in (('core_experts', core, h), ('univ_experts', univ, hu)):
                q = f'{p}mlp.{group}.'
                sd[q + 'vit_fc1.weight'] = rand(n, hidden, d, scale=d ** -0.5)  # (E, out, in)
                sd[q + 'vit_fc1.bias'] = rand(n, hidden, scale=0.1)
                sd[q + 'vit_fc2.weight'] = rand(n, d, hidden, scale=hidden ** -0.5)
                sd[q + 'vit_fc2.bias'] = rand(n, d, scale=0.1)
        else:
            sd.update(linear(p + 'mlp.fc1', h, d))
            sd.update(linear(p + 'mlp.fc2', d, h))
    sd.update(norm('fc_norm'))  # global_pool='avg': the final norm is fc_norm, `norm` is an Identity
    sd.update(linear('head', num_classes, d))
    return sd


def tiny_official(tiny, seed=0, **overrides):
    cfg = dict(embed_dim=tiny['embed_dim'], depth=tiny['depth'], patch=tiny['patch_size'], img=tiny['img_size'],
               num_classes=10, moe_blocks=range(tiny['depth'] // 2, tiny['depth']), core=tiny['num_core_experts'],
               univ=tiny['num_univ_experts'], seed=seed)
    cfg.update(overrides)
    return official_state_dict(**cfg)


def assert_holds_official(model, sd, skip=None):
    """Every model tensor equals its official counterpart (experts transposed, temperatures = scales)."""
    own = {k: v for k, v in model.state_dict().items() if not (skip and k.startswith(skip))}
    checked = set()
    for k, v in sd.items():
        if skip and k.startswith(skip):
            continue
        m = re.match(r'blocks\.(\d+)\.mlp\.(.+)$', k)
        name = m and m[2]
        if m is None or not isinstance(model.blocks[int(m[1])].mlp, SpheroMoE):
            key, want = k, v
        elif name == 'phi':
            key, want = k.replace('phi', 'slot_query'), v
        elif name.startswith('scales.'):
            layer = model.blocks[int(m[1])].mlp
            torch.testing.assert_close(layer.temperature[int(name[-1])], v, rtol=1e-6, atol=0)
            checked.add(k.replace(name, 'temp_raw'))
            continue
        elif '.vit_fc' in name:
            key = k.replace('.vit_fc', '.fc')
            want = v.transpose(1, 2) if k.endswith('weight') else v
        else:
            key, want = k, v
        assert torch.equal(own[key], want), key
        checked.add(key)
    assert checked == set(own), set(own) ^ checked


# ---------------------------------------------------------------------------------------------------------
# The official layer, from its equations (DualPathSoftMoELayerWrapper + MultiExpertLayer), in float64

def entmax15_bisect(z: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """1.5-entmax from its definition: p = [z/2 - tau]_+^2 with the tau that makes p sum to one (bisection)."""
    z = z.double() / 2
    hi = z.amax(-1, keepdim=True)  # sum(p) = 0 at tau = max(z/2)
    lo = hi - 1  # sum(p) >= 1 at tau = max(z/2) - 1
    for _ in range(iters):
        tau = (lo + hi) / 2
        big = ((z - tau).clamp(min=0) ** 2).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(big, tau, lo), torch.where(big, hi, tau)
    return (z - (lo + hi) / 2).clamp(min=0) ** 2


def official_layer(sd, block, x, noise=None, drop_path_mask=None, dropout_masks=None):
    """x (B, N, d) -> (B, N, d). noise (B, N, E, S); drop_path_mask (B, 1, 1); dropout_masks {(group, 1|2): mask}
    with masks (B, E, S, hidden) / (B, E, S, d) already scaled by 1 / keep."""
    p = f'blocks.{block}.mlp.'
    t = {k[len(p):]: v.double() for k, v in sd.items() if k.startswith(p)}
    x = x.double()

    def l2norm(v):
        return v * (1 / (torch.sqrt((v ** 2).sum(-1, keepdim=True)) + 1e-6))

    key = l2norm(x)
    query = l2norm(F.layer_norm(t['phi'], t['phi'].shape[-1:], t['slot_norm.weight'], t['slot_norm.bias'], 1e-5))
    logits = torch.einsum('bnd,esd->bnes', key, query)
    dispatch_logits, combine_logits = logits / t['scales.0'], logits / t['scales.1']
    if noise is not None:
        dispatch_logits, combine_logits = dispatch_logits + noise, combine_logits + noise
    z = dispatch_logits - dispatch_logits.amax(dim=-3, keepdim=True)
    dispatch = z.exp() / z.exp().sum(dim=-3, keepdim=True)  # over tokens
    combine = entmax15_bisect(combine_logits.flatten(-2))  # over all E * S slots of a token
    slots = torch.einsum('bnd,bnes->besd', x, dispatch)

    n_core = t['core_experts.vit_fc1.weight'].shape[0]
    outs = []
    for group, s in (('core_experts', slots[:, :n_core]), ('univ_experts', slots[:, n_core:])):
        hid = torch.einsum('besi,eoi->beso', s, t[group + '.vit_fc1.weight']) + t[group + '.vit_fc1.bias'][:, None]
        hid = F.gelu(hid)  # exact erf GELU
        if dropout_masks:
            hid = hid * dropout_masks[(group, 1)]
        y = torch.einsum('besi,eoi->beso', hid, t[group + '.vit_fc2.weight']) + t[group + '.vit_fc2.bias'][:, None]
        if dropout_masks:
            y = y * dropout_masks[(group, 2)]
        outs.append(y)
    out = torch.cat(outs, dim=1).flatten(1, 2)  # (B, E * S, d)
    if drop_path_mask is not None:
        out = out * drop_path_mask
    return torch.einsum('bmd,bnm->bnd', out, combine)


def tiny_model(tiny, **kwargs):
    return timm.create_model('v_jetmoe_tiny', **dict(tiny, routing='official', **kwargs))


# ---------------------------------------------------------------------------------------------------------
# layer semantics

@pytest.mark.parametrize('slots', [1, 2])
def test_official_preset_matches_official_equations(tiny_vit_kwargs, slots):
    sd = tiny_official(tiny_vit_kwargs, slots=slots)
    model = tiny_model(tiny_vit_kwargs, slots_per_expert=slots, num_classes=10).eval()
    model.load_state_dict(sd)
    torch.manual_seed(0)
    x = torch.randn(3, 17, tiny_vit_kwargs['embed_dim']) * 3
    for i in model.moe_blocks:
        layer = model.blocks[i].mlp
        assert layer.combine == 'entmax15'
        want = official_layer(sd, i, x)
        torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-5)
        assert want.abs().mean() > 0.1  # a meaningful scale for the tolerance
    # the sparse combine is active: some slots get exactly zero weight
    layer.capture_routing = True
    layer(x)
    assert (layer.last_routing['combine'] == 0).any()


def test_official_noise_and_expert_drop_path_match(tiny_vit_kwargs):
    """Noise (one draw, 1/E, after the temperatures, on both logits) and drop path on the expert outputs."""
    sd = tiny_official(tiny_vit_kwargs)
    model = tiny_model(tiny_vit_kwargs, num_classes=10, moe_noise_at_eval=True, moe_drop_path_rate=0.9)
    model.load_state_dict(sd)
    layer, i = model.blocks[3].mlp, 3
    B, N, d = 16, 17, tiny_vit_kwargs['embed_dim']
    E = layer.num_experts
    x = torch.randn(B, N, d)

    layer.eval()  # noise at inference, as officially when moe_noise_at_eval=True
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    noise = torch.normal(mean=0, std=1, size=(B, N, E, 1)) * (1 / E)
    torch.testing.assert_close(got.double(), official_layer(sd, i, x, noise=noise), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, layer.train(False).eval()(x))  # a fresh draw differs

    layer.train()  # + per-sample drop path (rate 0.9 * 3/3), drawn after the (zero-rate) expert dropouts
    torch.manual_seed(2)
    got = layer(x)
    torch.manual_seed(2)
    noise = torch.normal(mean=0, std=1, size=(B, N, E, 1)) * (1 / E)
    keep = 1 - layer.expert_drop_path
    mask = torch.empty(B, 1, 1).bernoulli_(keep) / keep
    assert 0 < (mask == 0).sum() < B
    torch.testing.assert_close(got.double(), official_layer(sd, i, x, noise, mask.double()), atol=1e-5, rtol=1e-5)


def test_official_element_dropout_matches(tiny_vit_kwargs):
    """Expert dropout is element-wise, after GELU and after fc2, scaled by 1/keep (training only)."""
    slots = 2
    sd = tiny_official(tiny_vit_kwargs, slots=slots)
    model = tiny_model(tiny_vit_kwargs, num_classes=10, slots_per_expert=slots, moe_drop_rate=0.4,
                       moe_noise_mult=0.)
    model.load_state_dict(sd)
    layer = model.blocks[2].mlp.train()
    B, N, d = 3, 17, tiny_vit_kwargs['embed_dim']
    captured = {}

    def capture(group, which):
        def hook(module, inputs, output):
            kept = output != 0
            torch.testing.assert_close(output[kept], inputs[0][kept] / (1 - module.p))
            E = getattr(layer, group).num_experts
            mask = kept.double() / (1 - module.p)  # (E, S * B, h), row s * B + b
            captured[(group, which)] = mask.view(E, slots, B, -1).permute(2, 0, 1, 3)  # official (B, E, S, h)
        return hook

    for group in ('core_experts', 'univ_experts'):
        getattr(layer, group).drop1.register_forward_hook(capture(group, 1))
        getattr(layer, group).drop2.register_forward_hook(capture(group, 2))
    x = torch.randn(B, N, d)
    got = layer(x)
    dropped = sum((m == 0).double().mean() for m in captured.values()) / len(captured)
    assert 0.3 < dropped < 0.5
    torch.testing.assert_close(got.double(), official_layer(sd, 2, x, dropout_masks=captured), atol=1e-5, rtol=1e-5)


def test_entmax15_matches_its_definition_at_official_sizes():
    torch.manual_seed(0)
    cases = [
        (torch.randn(4, 294) / 0.5, -1),  # one token over the official 294 slots, at the initial temperature
        (torch.randn(2, 9, 294) * 10, -1),  # very peaked
        (torch.randn(3, 7, 5) * 3, 1),  # a middle dimension
        (torch.randn(6, 3) * 1e-3, 0),  # nearly uniform: dense
    ]
    for z, dim in cases:
        for dtype in (torch.float32, torch.float64):
            got = entmax15(z.to(dtype), dim=dim)
            assert got.dtype == dtype and got.shape == z.shape
            want = entmax15_bisect(z.transpose(dim, -1)).transpose(dim, -1)
            tol = 1e-6 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    # adding a constant to the scores changes nothing
    z = torch.randn(5, 20, dtype=torch.float64) * 3
    torch.testing.assert_close(entmax15(z + 7.5), entmax15(z))


def test_entmax15_maximises_its_objective():
    """entmax15(z) = argmax over the simplex of <p, z> + (1 - sum p^1.5) / 0.75 (Tsallis entropy, alpha 1.5)."""
    torch.manual_seed(0)
    z = torch.randn(8, 12, dtype=torch.float64) * 2

    def objective(p):
        return (p * z).sum(-1) + (1 - p.clamp(min=0).pow(1.5).sum(-1)) / 0.75

    best = objective(entmax15(z))
    for _ in range(50):
        other = torch.distributions.Dirichlet(torch.full((12,), 0.3, dtype=torch.float64)).sample((8,))
        assert (objective(other) <= best + 1e-12).all()
        # and small moves along the simplex from the solution never help
        nudged = (entmax15(z) + 1e-3 * (other - entmax15(z)))
        assert (objective(nudged) <= best + 1e-12).all()


# ---------------------------------------------------------------------------------------------------------
# key layout

def test_full_size_layout_matches_the_official_one():
    """On the meta device: the full V-JetMoE-T official layout has the official names, shapes and count."""
    want = official_state_dict(**FULL, device='meta')
    assert sum(v.numel() for v in want.values()) == 265_411_636  # the official model's parameter count
    model = timm.create_model('v_jetmoe_tiny.official_in1k', device='meta')
    got = timm_to_official(model.state_dict(), model)
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in want.items()}
    assert is_official_state_dict(want) and not is_official_state_dict(model.state_dict())


def test_round_trip_is_lossless(tiny_vit_kwargs):
    model = tiny_model(tiny_vit_kwargs, num_classes=10, slots_per_expert=2)
    with torch.no_grad():
        for b in model.moe_blocks:
            model.blocks[b].mlp.temp_raw.uniform_(-2, 2)
    timm_sd = model.state_dict()
    official = timm_to_official(timm_sd, model)
    assert official.keys() == tiny_official(tiny_vit_kwargs, slots=2).keys()
    back = official_to_timm(official, model)
    assert back.keys() == timm_sd.keys()
    for k, v in timm_sd.items():
        if k.endswith('temp_raw'):  # through softplus and back: float32 rounding only
            torch.testing.assert_close(back[k], v, rtol=0, atol=2e-6)
        else:
            assert torch.equal(back[k], v), k

    sd = tiny_official(tiny_vit_kwargs, slots=2)  # the other way round
    again = timm_to_official(official_to_timm(sd, model), model)
    assert again.keys() == sd.keys()
    for k, v in sd.items():
        assert again[k].shape == v.shape and again[k].dtype == v.dtype, k
        if '.scales.' in k:
            torch.testing.assert_close(again[k], v, rtol=1e-6, atol=0)
        else:
            assert torch.equal(again[k], v), k


# ---------------------------------------------------------------------------------------------------------
# loading paths

@pytest.mark.parametrize('wrap', ['plain', 'mmengine', 'model.', 'backbone.', 'module.model.', '_orig_mod.'])
def test_load_checkpoint_takes_wrapped_official_files(tiny_vit_kwargs, tmp_path, wrap):
    sd = tiny_official(tiny_vit_kwargs)
    if wrap == 'mmengine':
        saved = {'meta': {'epoch': 300, 'cfg': 'model = dict(...)'}, 'state_dict': sd}
    elif wrap == 'plain':
        saved = sd
    else:
        saved = {'model': {wrap + k: v for k, v in sd.items()}}
    path = tmp_path / 'official.pth'
    torch.save(saved, path)
    model = tiny_model(tiny_vit_kwargs, num_classes=10)
    result = timm.models.load_checkpoint(model, str(path))  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert_holds_official(model, sd)


def test_filter_fn_for_models_built_without_create_model(tiny_vit_kwargs, tmp_path):
    sd = tiny_official(tiny_vit_kwargs)
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': sd}, path)
    args = dict(tiny_vit_kwargs, routing='official', num_classes=10, global_pool='avg')
    model = VisionTransformerJetMoE(**args)
    timm.models.load_checkpoint(model, str(path), filter_fn=checkpoint_filter_fn)  # the filter maps it ...
    assert_holds_official(model, sd)
    model = VisionTransformerJetMoE(**args)
    model.load_state_dict(sd)  # ... and so does the hook, which a bare class instance has too (was: create_model's)
    assert_holds_official(model, sd)


def test_hook_follows_deepcopy(tiny_vit_kwargs):
    model = tiny_model(tiny_vit_kwargs, num_classes=10)
    twin = copy.deepcopy(model)
    before = model.state_dict()['cls_token'].clone()
    sd = tiny_official(tiny_vit_kwargs)
    twin.load_state_dict(sd)
    assert_holds_official(twin, sd)
    assert torch.equal(model.state_dict()['cls_token'], before)


def test_pretrained_file_overlay_with_official_tag(tiny_vit_kwargs, tmp_path):
    sd = tiny_official(tiny_vit_kwargs)
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': sd}, path)
    model = timm.create_model(
        'v_jetmoe_tiny.official_in1k', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        **tiny_vit_kwargs)
    assert all(model.blocks[i].mlp.combine == 'entmax15' for i in model.moe_blocks)
    assert model.pretrained_cfg['mean'] == IMAGENET_DEFAULT_MEAN
    assert_holds_official(model, sd)


def test_train_py_pretrained_path_keeps_everything_but_the_head(tiny_vit_kwargs, tmp_path):
    """train.py --pretrained-path P passes pretrained_cfg_overlay=dict(file=P, num_classes=-1): a new head."""
    sd = tiny_official(tiny_vit_kwargs)
    path = tmp_path / 'official.pth'
    torch.save(sd, path)
    model = timm.create_model(
        'v_jetmoe_tiny.official_in1k', pretrained=True, num_classes=5,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=-1), **tiny_vit_kwargs)
    assert model.head.weight.shape == (5, tiny_vit_kwargs['embed_dim'])
    assert_holds_official(model, sd, skip='head.')


def test_official_tag_builds_the_official_layer(tiny_vit_kwargs):
    def combines(model):
        return {model.blocks[i].mlp.combine for i in model.moe_blocks}

    assert combines(timm.create_model('v_jetmoe_tiny.official_in1k', **tiny_vit_kwargs)) == {'entmax15'}
    assert combines(timm.create_model('v_jetmoe_tiny', pretrained_cfg='official_in1k', **tiny_vit_kwargs)) == \
        {'entmax15'}
    assert combines(timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)) == {'softmax'}
    # the caller's choice wins
    model = timm.create_model('v_jetmoe_tiny.official_in1k', routing='sphero', **tiny_vit_kwargs)
    assert combines(model) == {'softmax'}


def test_official_tag_without_a_file_fails_offline_with_the_fix(tiny_vit_kwargs):
    with pytest.raises(RuntimeError, match='pretrained_cfg_overlay=dict\\(file='):
        timm.create_model('v_jetmoe_tiny.official_in1k', pretrained=True)


def test_convert_reads_the_layout_and_loads_from_local_dir(tiny_vit_kwargs, tmp_path):
    # a Table-4 style variant: MoE in blocks 1 and 3, 3 core + 6 universal experts, 2 slots, 7 classes
    sd = tiny_official(tiny_vit_kwargs, moe_blocks=(1, 3), core=3, univ=6, slots=2, num_classes=7)
    path = tmp_path / 'official.pth'
    torch.save({'meta': {'epoch': 300}, 'state_dict': {'model.' + k: v for k, v in sd.items()}}, path)
    arch = {k: tiny_vit_kwargs[k] for k in ('embed_dim', 'depth', 'num_heads', 'patch_size')}
    out = convert_official_checkpoint(path, tmp_path / 'converted', **arch)

    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['routing'] == 'official'
    assert config['model_args']['moe_blocks'] == [1, 3]
    assert config['model_args']['img_size'] in (32, [32, 32])
    assert config['pretrained_cfg']['tag'] == 'official_in1k' and config['num_classes'] == 7
    provenance = read_provenance(out / 'model.safetensors')
    assert provenance['source'] == 'official' and provenance['file'] == 'official.pth'
    assert provenance['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert config['jetmoe'] == provenance

    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert model.moe_blocks == [1, 3] and model.blocks[1].mlp.slots_per_expert == 2
    assert all(model.blocks[i].mlp.combine == 'entmax15' for i in model.moe_blocks)
    assert_holds_official(model, sd)
    torch.manual_seed(0)
    x = torch.randn(2, 17, tiny_vit_kwargs['embed_dim'])
    torch.testing.assert_close(model.blocks[3].mlp(x).double(), official_layer(sd, 3, x), atol=1e-5, rtol=1e-5)

    with pytest.raises(FileExistsError, match='already exists'):
        convert_official_checkpoint(path, out, **arch)

    # what the file's tensors are is not overridden (a 7-class head, a 32 px grid): one line, the folder loads so
    for wrong in (dict(num_classes=0), dict(img_size=64)):
        (k, v), = wrong.items()
        with pytest.raises(ValueError, match=f"{k}={v}: the checkpoint has {k}=.*local-dir:OUT', pretrained=True, {k}"):
            convert_official_checkpoint(path, tmp_path / 'wrong', **arch, **wrong)
        assert not (tmp_path / 'wrong').exists()
    adapted = timm.create_model(f'local-dir:{out}', pretrained=True, num_classes=0, img_size=64)
    assert adapted.num_classes == 0 and adapted.pos_embed.shape[1] == (64 // tiny_vit_kwargs['patch_size']) ** 2 + 1


def test_convert_refuses_pickled_objects_unless_trusted(tiny_vit_kwargs, tmp_path):
    sd = tiny_official(tiny_vit_kwargs)
    path = tmp_path / 'with_training_state.pth'
    torch.save({'state_dict': sd, 'message_hub': _TrainingState()}, path)
    arch = {k: tiny_vit_kwargs[k] for k in ('embed_dim', 'depth', 'num_heads', 'patch_size')}
    with pytest.raises(RuntimeError, match='weights_only=False'):
        convert_official_checkpoint(path, tmp_path / 'a', **arch)
    out = convert_official_checkpoint(path, tmp_path / 'b', weights_only=False, **arch)
    assert_holds_official(timm.create_model(f'local-dir:{out}', pretrained=True), sd)


class _TrainingState:
    """Stands in for mmengine's message hub: a pickled object that is not a tensor."""


def test_convert_rejects_non_official_files(tiny_vit_kwargs, tmp_path):
    path = tmp_path / 'timm.pth'
    torch.save(tiny_model(tiny_vit_kwargs).state_dict(), path)
    with pytest.raises(ValueError, match='not an official MoE Jetpack checkpoint'):
        convert_official_checkpoint(path, tmp_path / 'out')
    with pytest.raises(FileNotFoundError, match=r'No checkpoint at .*missing.pth: pass the official checkpoint file'):
        convert_official_checkpoint(tmp_path / 'missing.pth', tmp_path / 'out')


@pytest.mark.parametrize('change,match', [
    (dict(moe_blocks=[3]), r'build the model with moe_blocks=\[2, 3\]'),
    (dict(num_core_experts=5), 'num_core_experts=4'),
    (dict(slots_per_expert=2), 'slots_per_expert=1'),
    (dict(univ_ratio=0.5), 'univ_ratio=0.25'),
    (dict(global_pool='token'), "global_pool='avg'"),
    (dict(embed_dim=64), 'width 32'),
])
def test_mismatched_models_name_the_fix(tiny_vit_kwargs, change, match):
    model = tiny_model(tiny_vit_kwargs, num_classes=10, **change)
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(tiny_official(tiny_vit_kwargs))


def test_bad_temperatures_and_unsupported_variants_name_the_fix(tiny_vit_kwargs):
    model = tiny_model(tiny_vit_kwargs, num_classes=10)
    sd = tiny_official(tiny_vit_kwargs)
    sd['blocks.3.mlp.scales.1'] = torch.tensor(0.005)
    with pytest.raises(ValueError, match=r'blocks\.3\.mlp\.scales\.1 = 0\.005.*temperature_min'):
        official_to_timm(sd, model)
    for layer in model.modules():  # the documented way out for a small positive temperature
        if isinstance(layer, SpheroMoE):
            layer.temperature_min = 1e-3
    model.load_state_dict(sd)
    torch.testing.assert_close(model.blocks[3].mlp.temperature[1], torch.tensor(0.005))

    single_path = {k.replace('core_experts', 'experts'): v for k, v in tiny_official(tiny_vit_kwargs).items()
                   if 'univ_experts' not in k}
    with pytest.raises(ValueError, match='single-path'):
        official_to_timm(single_path, model)
    softmoe = timm.create_model('v_jetmoe_tiny', **dict(tiny_vit_kwargs, routing='softmoe', num_univ_experts=0))
    sd = tiny_official(tiny_vit_kwargs, univ=0)
    sd = {k: v for k, v in sd.items() if 'univ_experts' not in k}
    with pytest.raises(ValueError, match="routing='official'"):
        official_to_timm(sd, softmoe)


def test_softmax_model_warns(tiny_vit_kwargs, caplog):
    model = timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs)
    with caplog.at_level(logging.WARNING, logger='jetmoe_timm.official'):
        model.load_state_dict(tiny_official(tiny_vit_kwargs))
    assert "routing='official'" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# the full V-JetMoE-T (265 M parameters, ~1 GB in float32)

@pytest.mark.slow
def test_full_size_official_checkpoint_through_every_path(tmp_path):
    sd = official_state_dict(**FULL, seed=1)
    path = tmp_path / 'official_vit_tiny_moe.pth'
    torch.save({'meta': {'epoch': 300}, 'state_dict': sd}, path)

    # 1. the official tag with the downloaded file: timm's pretrained loading, strict
    model = timm.create_model('v_jetmoe_tiny.official_in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert {model.blocks[i].mlp.combine for i in model.moe_blocks} == {'entmax15'}
    assert_holds_official(model, sd)

    # 2. timm.models.load_checkpoint into an existing model, strict
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    timm.models.load_checkpoint(model, str(path))
    assert_holds_official(model, sd)
    del model

    # 3. convert to a timm folder, then local-dir:
    out = convert_official_checkpoint(path, tmp_path / 'v_jetmoe_tiny.official_in1k')
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert {model.blocks[i].mlp.combine for i in model.moe_blocks} == {'entmax15'}
    assert model.num_classes == 1000 and model.pretrained_cfg['crop_pct'] == 0.875
    assert_holds_official(model, sd)
