"""What every JetMoE family shares (``models/_moe.py``), checked once for each family."""
import gc
import weakref

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from jetmoe_timm import set_autocast_weight_cache, set_keep_grad_memory, set_routing_capture
from jetmoe_timm.layers import SpheroMoE

FAMILIES = {  # family: (model name, smallest kwargs, its dense MLP's module name in a block)
    'vit': ('v_jetmoe_tiny', dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                  num_core_experts=2, num_univ_experts=3), 'blocks.0.mlp'),
    'convnext': ('c_jetmoe_femto', dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=2,
                                        num_univ_experts=3), 'stages.0.blocks.0.mlp'),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_every_moe_option_reaches_every_moe_layer(family):
    """The model kwargs of MoEOptions arrive, each under its layer name, in every SpheroMoE layer; expert drop path
    follows the blocks' linear schedule up to moe_drop_path_rate."""
    name, kwargs, _ = family
    model = timm.create_model(name, **kwargs, univ_ratio=0.5, slots_per_expert=2, routing='official',
                              moe_combine='softmax', moe_noise_mult=0.5, moe_noise_at_eval=True, moe_drop_rate=0.3,
                              moe_drop_mode='expert', moe_drop_path_rate=0.2)
    layers = list(model.moe_layers().values())
    said = dict(routing='official', combine='softmax', slots_per_expert=2, noise_mult=0.5, noise_at_eval=True,
                expert_drop=0.3, expert_drop_mode='expert')
    for layer in layers:
        assert {k: getattr(layer, k) for k in said} == said
        assert layer.univ_hidden == layer.core_hidden // 2  # univ_ratio of the core experts' hidden width
    depth = sum(1 for k in model.state_dict() if k.endswith('norm1.weight') or k.endswith('conv_dw.weight'))
    assert [layer.expert_drop_path for layer in layers] == pytest.approx([0.2 * i / (depth - 1) for i in model.moe_blocks])


def test_bf16_autocast_close_to_float32(family):
    name, kwargs, _ = family
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        torch.testing.assert_close(out.float(), model(x), rtol=0.05, atol=0.01)  # bf16's 8 bits of mantissa


def test_moe_blocks_take_indices_as_timms_out_indices(family):
    """One int is one block (--model-kwargs moe_blocks=3), negative indices count from the end; anything but ints
    is refused (a string was read as its digits, a float truncated)."""
    name, kwargs, _ = family
    model = timm.create_model(name, moe_blocks=-1, **kwargs)
    last = model.moe_blocks
    assert len(last) == 1 and len(model.moe_layers()) == 1 and last == timm.create_model(name, **kwargs).moe_blocks[-1:]
    assert timm.create_model(name, moe_blocks=(0, last[0]), **kwargs).moe_blocks == [0, last[0]]
    assert timm.create_model(name, moe_blocks=(0, -1), **kwargs).moe_blocks == [0, last[0]]
    for wrong in ('23', (1.5,)):
        with pytest.raises(TypeError, match='moe_blocks takes block indices'):
            timm.create_model(name, moe_blocks=wrong, **kwargs)
    with pytest.raises(ValueError, match=f'must lie in -{last[0] + 1}..{last[0]}'):
        timm.create_model(name, moe_blocks=(last[0] + 1,), **kwargs)


def test_every_family_says_its_dense_layout(family):
    """The model card's architecture line comes from the model: a family that leaves ``dense_layout`` to the mixin
    (which names only the class) fails here, not on a model card."""
    name, kwargs, _ = family
    model = timm.create_model(name, device='meta', **kwargs)
    layout = model.dense_layout()
    assert layout.startswith('a ') and '\n' not in layout and type(model).__name__ not in layout


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_built_in_16_bit_floats(family, dtype):
    """timm's dtype= builds the model in that dtype, as for the dense models (the slot queries' orthogonal init
    failed: no CPU QR for 16-bit floats); the queries are the float32 build's, rounded."""
    name, kwargs, _ = family
    torch.manual_seed(0)
    model = timm.create_model(name, dtype=dtype, **kwargs)
    torch.manual_seed(0)
    reference = timm.create_model(name, **kwargs)
    assert {p.dtype for p in model.parameters()} == {dtype}
    for (key, q), q32 in zip(model.state_dict().items(), reference.state_dict().values()):
        if key.endswith('slot_query'):
            assert torch.equal(q, q32.to(dtype))
    size = kwargs.get('img_size', 32)
    assert torch.isfinite(model.eval()(torch.randn(2, 3, size, size, dtype=dtype))).all()

def test_prune_intermediate_layers_keeps_moe_blocks_to_the_blocks_left(family):
    """timm's prune_intermediate_layers drops the trailing blocks: moe_blocks then lists only the MoE blocks left
    (it kept listing the removed ones)."""
    name, kwargs, _ = family
    model = timm.create_model(name, **kwargs)
    moe_blocks = model.moe_blocks
    assert model.prune_intermediate_layers([2]) == [2]  # ViT: blocks 0..2; ConvNeXt: stages 0..2
    assert 0 < len(model.moe_layers()) < len(moe_blocks) and model.moe_blocks == moe_blocks[:len(model.moe_layers())]
    model.prune_intermediate_layers([1])
    assert model.moe_blocks == [] and not model.moe_layers()


@pytest.mark.parametrize('act_layer, act_name', [('relu', 'relu'), ('silu', 'silu'), (None, 'gelu')])
def test_experts_use_the_dense_mlps_activation(family, act_layer, act_name):
    name, kwargs, dense_mlp = family
    kwargs = dict(kwargs, act_layer=act_layer) if act_layer else kwargs
    model = timm.create_model(name, **kwargs)
    dense = model.get_submodule(dense_mlp).act
    assert type(dense).__name__.lower() == act_name  # timm's GELU or torch's, as the family builds it
    for moe in model.moe_layers().values():
        for experts in (moe.core_experts, moe.univ_experts):
            assert type(experts.act) is type(dense)


@pytest.mark.parametrize('options', [False, True])
def test_deleted_model_is_freed_without_the_cycle_collector(family, options):
    """A deleted model frees its weights at once, as a dense timm model does: no reference cycle keeps it until the
    cycle collector runs (a loop over 6 GB c_jetmoe_tiny models would pile them up), after training and inference
    steps, and with routing capture, kept gradient memory and autocast weight copies on."""
    name, kwargs, _ = family
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        model = timm.create_model(name, **kwargs)
        if options:
            set_routing_capture(model)
            set_keep_grad_memory(model)
            set_autocast_weight_cache(model)
        opt = create_optimizer_v2(model, 'adamw', lr=1e-3)
        x = torch.randn(2, 3, 32, 32)
        for _ in range(2):  # the second step reuses kept gradient memory
            model(x).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=options):
            model(x)
        layer = next(iter(model.moe_layers().values()))
        if options:  # each option holds what it keeps
            assert layer.last_routing is not None
            assert layer.core_experts.fc1._grad_buffer is not None
            assert layer.core_experts.fc1._autocast_copy is not None
        refs = [weakref.ref(model), weakref.ref(layer.core_experts.fc1.weight)]
        del model, opt, layer
        assert [ref() for ref in refs] == [None, None]
    finally:
        if was_enabled:
            gc.enable()


def test_moe_layers_weight_decay_and_layer_decay_groups(family):
    name, kwargs, _ = family
    model = timm.create_model(name, **kwargs)
    layers = model.moe_layers()
    assert layers and all(isinstance(m, SpheroMoE) for m in layers.values())
    assert [f'{n}.mlp' for n in model.moe_block_names()] == list(layers)
    no_wd = model.no_weight_decay()
    for layer in layers:
        assert {f'{layer}.temp_raw', f'{layer}.core_experts.fc1.bias', f'{layer}.univ_experts.fc2.bias'} <= no_wd
    # under layer decay, the MoE layers and the norm feeding them train at the head's (full) rate
    groups = create_optimizer_v2(model, 'adamw', lr=1.0, weight_decay=0.05, layer_decay=0.5).param_groups
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    params = dict(model.named_parameters())
    head_scale = max(scale.values())
    for layer in layers:
        block = layer.rsplit('.', 1)[0]
        for key in (f'{layer}.slot_query', f'{layer}.core_experts.fc1.weight', f'{block}.{model.moe_norm}.weight'):
            assert scale[id(params[key])] == head_scale, key
    first = next(k for k in params if 'patch_embed' in k or k.startswith('stem'))
    assert scale[id(params[first])] < head_scale


def test_checkpoint_of_another_model_is_named_not_dumped(tmp_path):
    """Loading weights made for another model says, in one message, what they hold and what the model is."""
    from safetensors.torch import save_file
    files = {}
    for fam, (name, kwargs, _) in FAMILIES.items():
        other = timm.create_model(name, **dict(kwargs, num_core_experts=3))
        files[fam] = tmp_path / f'{fam}.safetensors'
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, files[fam])
    for fam, (name, kwargs, _) in FAMILIES.items():
        for source in files.values():  # the same family with other experts, and the other family
            with pytest.raises(ValueError, match='The checkpoint holds a model of width .* this .* is a model of') as e:
                timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(source)), **kwargs)
            assert '\n' not in str(e.value)


def test_checkpoint_with_other_prefix_tokens_is_named_not_a_reshape_error(tmp_path):
    """A file whose position embedding timm cannot resample (another prefix-token layout: DeiT-3 and DINOv2 keep
    none for the class token) gets the one-line refusal, not timm's reshape error: a dense DeiT-3 file is a dense
    checkpoint to recycle, a JetMoE file made with no_embed_class=True names the kwargs."""
    from safetensors.torch import save_file
    name, kwargs, _ = FAMILIES['vit']
    dense = timm.create_model('deit3_small_patch16_224', img_size=64, patch_size=8, embed_dim=64, depth=4,
                              num_heads=1, num_classes=0)
    save_file(dense.state_dict(), tmp_path / 'deit3.safetensors')
    with pytest.raises(ValueError, match='It is a dense checkpoint: recycle it into this model first'):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'deit3.safetensors')),
                          **dict(kwargs, img_size=64))
    save_file(timm.create_model(name, no_embed_class=True, **kwargs).state_dict(), tmp_path / 'nec.safetensors')
    with pytest.raises(ValueError, match=r"The checkpoint's pos_embed \(1, 16, 32\) cannot be resampled to this "
                                         r"model's \(1, 17, 32\): it was made with other prefix tokens"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nec.safetensors')),
                          **kwargs)


def test_a_missing_weights_file_is_named(family, tmp_path):
    """pretrained_cfg_overlay=dict(file=...) naming nothing: the path and what to pass (timm raised a
    FileNotFoundError without a message)."""
    name, kwargs, _ = family
    for tag in ('', '.official_in1k') if name.startswith('v_') else ('',):
        with pytest.raises(FileNotFoundError, match=f"pretrained weights file '{tmp_path / 'x.safetensors'}' .* "
                                                    f"does not exist: pass the path of an existing weights file"):
            timm.create_model(name + tag, pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'x.safetensors')))


def test_mlp_variants_the_experts_cannot_be_are_refused():
    """A GLU MLP (ViT mlp_layer) or ConvNeXt-V2's global response norm (use_grn) would hold in the dense blocks
    only, the experts being plain MLPs: refused when the model is built, instead of silently dropped."""
    from timm.layers import SwiGLUPacked
    with pytest.raises(ValueError, match=r"needs timm's plain Mlp \(fc1 -> act -> fc2\), not mlp_layer=GluMlp"):
        timm.create_model(FAMILIES['vit'][0], mlp_layer=SwiGLUPacked, **FAMILIES['vit'][1])
    with pytest.raises(ValueError, match='C-JetMoE needs use_grn=False'):
        timm.create_model(FAMILIES['convnext'][0], use_grn=True, **FAMILIES['convnext'][1])


def test_checkpoint_with_other_moe_blocks_names_them_and_the_widths(family):
    """A JetMoE checkpoint whose MoE layers sit in other blocks is no dense checkpoint: the message names the blocks
    found and the model's, and the widths (a ConvNeXt's per stage, read off the blocks: the stem is timm's)."""
    name, kwargs, _ = family
    model = timm.create_model(name, **kwargs)
    found = [model.moe_blocks[-1]]
    sd = timm.create_model(name, moe_blocks=found, **kwargs).state_dict()
    width = '32' if name.startswith('v_') else r'\(8, 16, 24, 32\)'
    with pytest.raises(ValueError, match=(
            rf'holds a model of width {width} with \d+ blocks, MoE in blocks \{found}.*is a model of width '
            rf'{width} with \d+ blocks, MoE in blocks \{model.moe_blocks}.*Create the model the checkpoint was made '
            rf'for \(moe_blocks=\{found} and its other model kwargs\)')) as e:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd), **kwargs)
    assert 'dense' not in str(e.value) and '?' not in str(e.value)
    # no JetMoE checkpoint at all: no moe_blocks to name
    with pytest.raises(ValueError, match=r'holds no JetMoE weights.*\(its model kwargs\)'):
        timm.create_model(name, pretrained=True, **kwargs,
                          pretrained_cfg_overlay=dict(state_dict=timm.create_model('resnet10t').state_dict()))
    # moe_blocks alone would not make the model it was made for where its depth (also per stage, with the same count
    # of blocks) or experts differ too: the advice is its moe_blocks with its other kwargs, never 'the same' ones
    others = [dict(kwargs, depth=3) if name.startswith('v_') else dict(kwargs, depths=(1, 2, 1, 1), moe_blocks=[4]),
              dict(kwargs, moe_blocks=found, num_core_experts=3)]
    for other in others:
        sd = timm.create_model(name, **other).state_dict()
        with pytest.raises(ValueError, match=r'with \d+ blocks, MoE in blocks .*Create the model the checkpoint was '
                                             r'made for \(moe_blocks=\[.*\] and its other model kwargs\)'):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd), **kwargs)


def test_compiled_grad_checkpointing_backpropagates_the_forwards_noise(tiny_vit_kwargs, monkeypatch):
    """torch.compile + set_grad_checkpointing in training: the routing noise (an opaque op on the CPU under compile)
    is drawn once; recomputed in backward, the gradients would belong to another draw (5 % off)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, 'force_disable_caches', True)  # a cached graph may predate the op's tags
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', num_classes=3, **tiny_vit_kwargs).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 32, 32)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        fn(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    eager, compiled = grads(model), grads(torch.compile(model, fullgraph=True))
    for name, g in eager.items():
        assert (compiled[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name
