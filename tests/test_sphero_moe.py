"""SpheroMoE against a plain reference computation, and the routing properties it must keep."""
import contextlib
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELU, GELUTanh

from jetmoe_timm.layers import ExpertLinear, SpheroMoE, entmax15, sphero_moe_reference


def _layer(**kwargs):
    args = dict(dim=16, num_core_experts=3, num_univ_experts=5, slots_per_expert=2)
    args.update(kwargs)
    torch.manual_seed(0)
    layer = SpheroMoE(**args)
    with torch.no_grad():  # non-trivial biases so that the reference comparison covers them
        for name, p in layer.named_parameters():
            if name.endswith('bias'):
                p.normal_(std=0.1)
    return layer


@pytest.mark.parametrize('combine', ['softmax', 'entmax15'])
@pytest.mark.parametrize('slots', [1, 2])
def test_matches_reference(combine, slots):
    layer = _layer(combine=combine, slots_per_expert=slots).eval()
    x = torch.randn(3, 11, 16)
    torch.testing.assert_close(layer(x), sphero_moe_reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('core,univ', [(4, 0), (0, 4)])
def test_single_path_matches_reference(core, univ):
    layer = _layer(num_core_experts=core, num_univ_experts=univ).eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), sphero_moe_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_softmoe_preset_matches_reference():
    layer = _layer(num_univ_experts=0, routing='softmoe').eval()
    assert layer.temp_raw.numel() == 1 and layer.noise_mult == 0
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), sphero_moe_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_channels_last_map_equals_tokens():
    layer = _layer().eval()
    x = torch.randn(2, 4, 5, 16)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, layer(x.flatten(1, 2)).view_as(x))


def test_routing_weights_are_distributions():
    layer = _layer().eval()
    layer.capture_routing = True
    x = torch.randn(2, 9, 16)
    out = layer(x)
    r = layer.last_routing
    M = layer.num_slots
    assert r['dispatch'].shape == (2, 9, M) and r['combine'].shape == (2, 9, M)
    torch.testing.assert_close(r['dispatch'].sum(1), torch.ones(2, M))  # each slot: over tokens
    torch.testing.assert_close(r['combine'].sum(2), torch.ones(2, 9))  # each token: over slots
    torch.testing.assert_close(r['core_out'] + r['univ_out'], out, atol=1e-5, rtol=1e-5)


def test_initial_temperature_and_positivity():
    layer = _layer()
    torch.testing.assert_close(layer.temperature, torch.full((2,), 0.5))
    with torch.no_grad():
        layer.temp_raw.fill_(-1e4)  # an optimiser pushing hard towards zero
    assert (layer.temperature >= layer.temperature_min).all()
    layer.temperature.sum().backward()
    assert layer.temp_raw.grad is not None


def test_noise_only_in_training():
    layer = _layer(noise_mult=0.5)
    x = torch.randn(2, 9, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)
    layer.eval()
    layer.noise_at_eval = True  # the official behaviour, opt-in
    torch.manual_seed(1)
    assert not torch.allclose(layer(x), layer(x))


def test_dropout_and_drop_path_only_in_training():
    layer = _layer(expert_drop=0.5, expert_drop_path=0.5, noise_mult=0.)
    x = torch.randn(4, 9, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), sphero_moe_reference(layer, x), atol=1e-5, rtol=1e-5)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), sphero_moe_reference(layer, x), atol=1e-3)


@pytest.mark.parametrize('mode', ['expert', 'element'])
def test_expert_drop_mode_drops_whole_experts_per_image(mode):
    """'expert': each expert's output for one image is dropped whole (every one of its slots zero) or kept whole
    (scaled by 1 / keep); 'element' drops hidden units inside the experts, which no slot shows that way."""
    layer = _layer(expert_drop=0.5, expert_drop_mode=mode, noise_mult=0.)
    layer.capture_routing = True
    x = torch.randn(8, 9, 16)
    layer.eval()
    layer(x)
    kept = layer.last_routing['slot_contrib'].unflatten(1, (layer.num_experts, -1)) / 0.5  # (B, experts, slots)
    layer.train()
    torch.manual_seed(0)
    layer(x)
    got = layer.last_routing['slot_contrib'].unflatten(1, (layer.num_experts, -1))
    dropped = (got == 0).all(-1)
    whole = dropped | torch.isclose(got, kept, rtol=1e-5, atol=1e-6).all(-1)
    if mode == 'expert':
        assert whole.all() and 0 < dropped.sum() < dropped.numel()  # some dropped, some kept, each whole
    else:
        assert not whole.any()


@pytest.mark.parametrize('rate', [0.999, 1.])
def test_expert_drop_mode_drops_every_expert_at_rate_one(rate):
    layer = _layer(expert_drop=rate, expert_drop_mode='expert', noise_mult=0.).train()
    x = torch.randn(2, 9, 16)
    torch.manual_seed(0)
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(out))  # every expert dropped: nothing passes (rate 1: not 0 / 0)


@pytest.mark.parametrize('combine', ['softmax', 'entmax15'])
def test_a_nan_image_spoils_its_own_output_only(combine):
    """Routing is per image: one image with a NaN gives NaN for that image and leaves the others as they were,
    with the sparse combine too (whose support of a NaN row is empty)."""
    layer = _layer(combine=combine).eval()
    x = torch.randn(3, 9, 16)
    clean = layer(x)
    x[1, 4, 2] = float('nan')
    out = layer(x)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[[0, 2]], clean[[0, 2]])


def test_every_parameter_gets_a_gradient():
    layer = _layer(expert_drop=0.1, expert_drop_path=0.1).train()
    layer(torch.randn(2, 9, 16)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_close_to_float32_with_float32_routing(dtype):
    layer = _layer().eval()
    layer.capture_routing = True
    x = torch.randn(2, 9, 16)
    with torch.autocast('cpu', dtype=dtype):
        out = layer(x)
    assert layer.last_routing['dispatch'].dtype == torch.float32
    torch.testing.assert_close(layer.last_routing['combine'].sum(-1), torch.ones(2, 9))
    torch.testing.assert_close(out.float(), layer(x), rtol=0.05, atol=0.01)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match='routing preset'):
        SpheroMoE(8, routing='nope')
    with pytest.raises(ValueError, match='num_univ_experts=0'):
        SpheroMoE(8, routing='softmoe')
    with pytest.raises(ValueError, match='at least one expert'):
        SpheroMoE(8, num_core_experts=0, num_univ_experts=0)
    with pytest.raises(ValueError, match='temperature 0.0 must exceed temperature_min'):  # not the default
        SpheroMoE(8, 2, 2, temperature_init=0.)


def test_entmax15_definition():
    z = torch.randn(5, 12, dtype=torch.float64) * 3
    p = entmax15(z, dim=-1)
    torch.testing.assert_close(p.sum(-1), torch.ones(5, dtype=torch.float64))
    assert (p == 0).any()  # sparse for spread-out scores
    # closed form: p = [z/2 - tau]_+^2, with one tau per row
    tau = z / 2 - p.sqrt()
    support = p > 0
    for row in range(5):
        t = tau[row][support[row]]
        torch.testing.assert_close(t, t.mean().expand_as(t))
        assert (z[row][~support[row]] / 2 <= t[0] + 1e-9).all()
    # it keeps the ranking, and small scores give a nearly uniform (dense) answer like softmax
    assert torch.equal(p.argmax(-1), z.argmax(-1))
    flat = entmax15(torch.zeros(1, 6, dtype=torch.float64) + 1e-3 * torch.randn(1, 6, dtype=torch.float64))
    assert (flat > 0).all()
    # gradient check against finite differences
    zz = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entmax15(t, dim=-1), (zz,))


def test_expert_weight_gradient_memory_is_reused_only_when_free():
    """With ``keep_grad_memory`` the weight gradient is written into memory kept across steps (no page faults on a
    fresh 58 MB buffer each step), and only when nothing else holds it: accumulation, kept gradients,
    autograd.grad, double backward, autocast, torch.func and old pickles see exactly what a plain baddbmm gives."""
    import copy
    from jetmoe_timm.layers import ExpertLinear, set_keep_grad_memory
    torch.manual_seed(0)
    layer = ExpertLinear(3, 4, 5)
    assert not layer.keep_grad_memory  # off by default: it holds a gradient-sized buffer through the forward
    set_keep_grad_memory(layer, True)
    x = torch.randn(3, 7, 4)

    def plain_grads(scale=1.):
        w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
        torch.baddbmm(b.unsqueeze(1), x * scale, w).square().sum().backward()
        return w.grad, b.grad

    ptrs = set()
    for _ in range(3):  # the usual loop: zero_grad(set_to_none=True), backward
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        want_w, want_b = plain_grads()
        assert torch.allclose(layer.weight.grad, want_w) and torch.allclose(layer.bias.grad, want_b)
        ptrs.add(layer.weight.grad.untyped_storage().data_ptr())
        assert layer.weight.grad.untyped_storage().data_ptr() == layer._grad_buffer.untyped_storage().data_ptr()
    assert len(ptrs) == 1  # one buffer for every step

    layer(x).square().sum().backward()  # no zero_grad: accumulates
    assert torch.allclose(layer.weight.grad, 2 * want_w)

    kept = layer.weight.grad  # a caller keeps the gradient past zero_grad: it must not be overwritten
    before = kept.clone()
    layer.zero_grad(set_to_none=True)
    layer(3 * x).square().sum().backward()
    assert torch.equal(kept, before) and torch.allclose(layer.weight.grad, plain_grads(3.)[0])

    layer.zero_grad(set_to_none=True)
    first = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    second = torch.autograd.grad(layer(2 * x).square().sum(), layer.weight)[0]
    assert torch.allclose(first, want_w) and torch.allclose(second, plain_grads(2.)[0])
    y = layer(layer(x)[..., :4])  # one module twice in one graph
    ref = copy.deepcopy(layer)
    set_keep_grad_memory(ref, False)
    layer.zero_grad(set_to_none=True)
    y.square().sum().backward()
    ref(ref(x)[..., :4]).square().sum().backward()
    assert torch.allclose(layer.weight.grad, ref.weight.grad)

    xg = x.clone().requires_grad_()  # double backward (gradient penalties, Hessian-vector products)
    g, = torch.autograd.grad(layer(xg).square().sum(), xg, create_graph=True)
    g.square().sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast runs the matmul in bf16: the plain path
        out = layer(x)
    out.float().sum().backward()
    params = {k: v.detach().requires_grad_() for k, v in layer.named_parameters()}
    fgrad = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    assert torch.allclose(fgrad['weight'], want_w)

    old = copy.deepcopy(layer)
    old.__dict__.pop('_grad_buffer', None)  # pickled by a version without the attribute
    old.zero_grad(set_to_none=True)
    old(x).square().sum().backward()
    assert copy.deepcopy(layer)._grad_buffer is None and layer._grad_buffer is not None
    assert layer.double()._grad_buffer is None  # .to() / .double() drop the kept memory
    assert torch.autograd.gradcheck(
        lambda a, w, b: ExpertLinear.forward.__globals__['_ExpertLinearFn'].apply(a, w, b, layer),
        tuple(torch.randn(s, dtype=torch.double, requires_grad=True) for s in ((2, 3, 4), (2, 4, 5), (2, 5))))


def test_no_grad_autocast_casts_the_weights_per_call(monkeypatch):
    """Under no_grad (not only inference_mode) and autocast, the experts cast their float32 weights themselves, so
    autocast does not keep every group's cast until its region ends: the matmul receives them already cast, and the
    outputs are autocast's own bit for bit, for bf16 and fp16, float32 or bf16 inputs. A float64 layer is left to
    run in float64, as autocast leaves it; with gradients on, autocast casts as before."""
    from torch.overrides import TorchFunctionMode
    from jetmoe_timm.layers import ExpertLinear

    class WeightDtypes(TorchFunctionMode):  # the weight dtypes torch.baddbmm receives from the layer
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.baddbmm:
                self.seen.append(args[2].dtype)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = SpheroMoE(16, 3, 6, routing='sphero').eval()
    x = torch.randn(2, 9, 16)

    def run(ctx, dtype, inputs, own):
        monkeypatch.setattr(ExpertLinear, '_casts_for_autocast', real if own else lambda self, t: False)
        with ctx(), torch.autocast('cpu', dtype=dtype), WeightDtypes() as mode:
            out = layer(inputs)
        return out, mode.seen

    real = ExpertLinear._casts_for_autocast
    for ctx in (torch.no_grad, torch.inference_mode):
        for dtype, inputs in ((torch.bfloat16, x), (torch.float16, x), (torch.bfloat16, x.bfloat16())):
            (own, seen), (autocasts, seen_before) = run(ctx, dtype, inputs, True), run(ctx, dtype, inputs, False)
            assert seen == [dtype] * 4 and seen_before == [torch.float32] * 4  # 2 groups x (fc1, fc2)
            assert own.dtype == dtype and torch.equal(own, autocasts), (ctx, dtype, inputs.dtype)
    monkeypatch.setattr(ExpertLinear, '_casts_for_autocast', real)

    double = copy.deepcopy(layer).double()  # autocast does not touch float64: neither do the experts
    with torch.no_grad():
        want = double(x.double())
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = double(x.double())
    assert got.dtype == torch.float64 and torch.equal(got, want)

    with torch.autocast('cpu', dtype=torch.bfloat16), WeightDtypes() as mode:  # training: autocast's cast
        layer(x).float().sum().backward()
    assert mode.seen == [torch.float32] * 4 and layer.core_experts.fc1.weight.grad is not None


def test_autocast_weight_copy_is_kept_between_eval_calls_and_never_stale():
    """With ``set_autocast_weight_cache`` (opt-in), the experts keep their weights cast to autocast's dtype between
    eval calls without gradients (autocast would cast V-JetMoE-T's 1 GB of expert weights again every call):
    outputs are bit for bit autocast's own, and the copy is never read once the weights may have changed: other
    tensors (also at a freed tensor's address), in-place writes, parametrizations, a forward with gradients
    (fused optimizers do not bump version counters), train(), .to(), pickling, switching it off."""
    import copy
    import pickle
    from torch.nn.utils import parametrize
    from jetmoe_timm.layers import ExpertLinear, set_autocast_weight_cache, set_keep_grad_memory
    torch.manual_seed(0)
    layer = SpheroMoE(16, 3, 6, routing='sphero').eval()
    x = torch.randn(2, 9, 16)
    recast = copy.deepcopy(layer)  # autocast's own cast on every call
    experts = [m for m in layer.modules() if isinstance(m, ExpertLinear)]
    assert not any(m.cache_autocast_weights for m in experts)  # opt-in
    set_autocast_weight_cache(layer)

    def run(m, ctx=torch.inference_mode, inputs=x):
        with ctx(), torch.autocast('cpu', dtype=torch.bfloat16):
            return m(inputs)

    def same():
        return torch.equal(run(layer), run(recast))

    assert same()
    copies = [m._autocast_copy[1] for m in experts]
    assert all(c.dtype == torch.bfloat16 and not c.is_inference() for c in copies)
    assert torch.equal(run(layer, torch.no_grad), run(recast, torch.no_grad))  # made in inference mode, read outside
    assert all(m._autocast_copy[1] is c for m, c in zip(experts, copies))  # kept, not cast again

    with torch.no_grad():  # an in-place change (load_state_dict, EMA updates) bumps the version: cast again
        for m in (layer, recast):
            m.core_experts.fc1.weight.mul_(-2.)
    assert same() and layer.core_experts.fc1._autocast_copy[1] is not copies[0]
    layer.load_state_dict(copy.deepcopy(recast.state_dict()))  # so is a load
    assert same()

    # train in eval mode (no dropout) with a fused optimizer: its steps leave the version counters alone, but
    # the forward with gradients drops the copies
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, fused=True) for m in (layer, recast)]
    for m, opt in zip((layer, recast), opts):
        m(x).square().sum().backward()
        versions = [p._version for p in m.parameters()]
        opt.step()
        assert [p._version for p in m.parameters()] == versions
    assert all(m._autocast_copy is None for m in experts) and same()
    # the same with the opt-in kept gradient memory, whose forward takes another path
    run(layer)
    set_keep_grad_memory(layer)
    layer(x).square().sum().backward()
    assert all(m._autocast_copy is None for m in experts)
    set_keep_grad_memory(layer, False)
    layer.zero_grad(set_to_none=True)

    # torch.utils.swap_tensors refuses a tensor with weak references: load_state_dict drops the copies first
    run(layer)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        layer.load_state_dict(recast.state_dict())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert all(m._autocast_copy is None for m in experts) and same()

    # functional_call with new parameters every call: a new tensor at the address of the last one, at the same
    # version (0), as when the allocator hands a freed block back; numpy memory makes that happen every time
    fc1 = layer.core_experts.fc1
    t = torch.randn(3, 2, 16)
    w_mem, b_mem = fc1.weight.detach().numpy().copy(), fc1.bias.detach().numpy().copy()
    for scale in (1., -1., 3.):
        w_mem[...], b_mem[...] = fc1.weight.detach().numpy() * scale, fc1.bias.detach().numpy() * scale
        params = {'weight': nn.Parameter(torch.from_numpy(w_mem)), 'bias': nn.Parameter(torch.from_numpy(b_mem))}
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            got = torch.func.functional_call(fc1, params, (t,))
            want = torch.baddbmm(params['bias'].unsqueeze(1), t, params['weight'])
        assert torch.equal(got, want) and params['weight']._version == 0
        del params

    class Negate(nn.Module):
        def forward(self, w):
            return -w
    for m in (layer, recast):  # a parametrized weight is computed anew on every access: never kept
        parametrize.register_parametrization(m.univ_experts.fc2, 'weight', Negate())
    layer.univ_experts.fc2._autocast_copy = None
    assert same() and layer.univ_experts.fc2._autocast_copy is None
    with torch.no_grad():
        for m in (layer, recast):
            m.univ_experts.fc2.parametrizations.weight.original.mul_(0.5)
    assert same()
    for m in (layer, recast):
        parametrize.remove_parametrizations(m.univ_experts.fc2, 'weight')
    assert same()

    run(layer)
    assert pickle.loads(pickle.dumps(layer)).core_experts.fc1._autocast_copy is None
    assert copy.deepcopy(layer).core_experts.fc1._autocast_copy is None
    layer.train()  # training changes the weights: the copies would only hold memory
    assert all(m._autocast_copy is None for m in experts)
    layer.eval()
    run(layer)
    layer.float()
    assert all(m._autocast_copy is None for m in experts)
    run(layer)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=False):
        layer.core_experts.fc1._autocast_copy = None
        layer(x)  # the caller turned autocast's caching off: no copy either
    assert layer.core_experts.fc1._autocast_copy is None
    set_autocast_weight_cache(layer, False)
    assert all(m._autocast_copy is None and not m.cache_autocast_weights for m in experts)


@pytest.mark.parametrize('routing,combine', [('sphero', 'softmax'), ('official', 'entmax15'), ('softmoe', None)])
@pytest.mark.parametrize('autocast', [False, True])
def test_no_grad_routing_in_kept_buffers_is_exact_and_never_aliased(routing, combine, autocast):
    """No-grad CPU calls write the (B, N, M) routing tensors into per-thread buffers shared by every layer (fresh
    ones page-fault on every call): outputs are bit for bit the gradient-tracking path's, whatever is returned
    or captured never points into the buffers, a layer run inside another's call (a hook) takes fresh tensors,
    and another thread keeps buffers of its own."""
    import threading
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    torch.manual_seed(0)
    univ = 0 if routing == 'softmoe' else 6
    layers = [SpheroMoE(16, 3, univ, routing=routing, combine=combine).eval() for _ in range(2)]
    x = torch.randn(2, 9, 16)
    amp = torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast)

    def no_grad_call(layer, inputs, ctx=torch.inference_mode):
        with ctx(), amp:
            return layer(inputs)

    free_no_grad_buffers()
    with amp:
        want = [layer(x).detach() for layer in layers]  # gradients tracked: fresh tensors, the reference path
    assert not NO_GRAD_BUFFERS.tensors
    first = no_grad_call(layers[0], x)
    names = {'logits', 'dispatch'} | ({'combine'} if layers[0].combine == 'softmax' else set())
    if not autocast:  # the experts too: float32 without autocast
        names |= {'core_hidden', 'expert_out'} | ({'univ_hidden'} if univ else set())
    assert {name for name, _, _ in NO_GRAD_BUFFERS.tensors} == names and not NO_GRAD_BUFFERS.busy
    ptrs = {k: v.data_ptr() for k, v in NO_GRAD_BUFFERS.tensors.items()}
    second = no_grad_call(layers[1], x, torch.no_grad)  # made under inference_mode, written outside it
    assert {k: v.data_ptr() for k, v in NO_GRAD_BUFFERS.tensors.items()} == ptrs  # one set for both layers
    assert torch.equal(first, want[0]) and torch.equal(second, want[1])  # the first output was not overwritten

    seen = {}
    thread = threading.Thread(target=lambda: seen.update(out=no_grad_call(layers[0], x),
                                                         ptrs={v.data_ptr() for v in NO_GRAD_BUFFERS.tensors.values()}))
    thread.start()
    thread.join()
    assert torch.equal(seen['out'], want[0]) and not seen['ptrs'] & set(ptrs.values())

    # a hook inside the experts runs the other layer while this call still holds the buffers
    def run_other_layer(*_):
        layers[1](2 * x)  # returns None: the hooked module's output stays its own
    hook = layers[0].core_experts.register_forward_hook(run_other_layer)
    assert torch.equal(no_grad_call(layers[0], x), want[0]) and not NO_GRAD_BUFFERS.busy
    hook.remove()

    layers[0].capture_routing = True  # captured routing outlives the call: fresh tensors
    no_grad_call(layers[0], x)
    captured = layers[0].last_routing['dispatch'].clone()
    no_grad_call(layers[1], 2 * x)
    assert torch.equal(layers[0].last_routing['dispatch'], captured)
    layers[0].capture_routing = False

    with amp:  # the reference at batch 1 too: BLAS results for one row may differ from its row in a batch of two
        want_one = layers[0](x[:1]).detach()
    assert torch.equal(no_grad_call(layers[0], x[:1]), want_one)  # another batch size: buffers replaced
    assert {batch for _, batch, _ in NO_GRAD_BUFFERS.tensors} == {1}
    layers[1].train()  # training routing draws noise (softmoe has none): the fresh path
    free_no_grad_buffers()
    no_grad_call(layers[1], x)
    assert bool(NO_GRAD_BUFFERS.tensors) == (routing == 'softmoe')


@pytest.mark.parametrize('kwargs', [
    dict(), dict(slots_per_expert=1), dict(num_univ_experts=0), dict(num_core_experts=0),
    dict(act_layer=functools.partial(nn.GELU, approximate='tanh')), dict(act_layer=GELU), dict(act_layer=GELUTanh),
])
def test_no_grad_experts_in_kept_buffers_are_exact(kwargs):
    """Float32 no-grad calls run the experts in the thread's buffers (hidden activations, GELU in place, outputs
    written without a concatenation): bit for bit the gradient-tracking path, for every expert layout and GELU,
    and the output of one call survives the next."""
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    layer = _layer(**kwargs).eval()
    x = torch.randn(3, 7, 16)
    want = layer(x).detach()
    free_no_grad_buffers()
    with torch.no_grad():
        got = layer(x)
        layer(2 * x)
    names = {name for name, _, _ in NO_GRAD_BUFFERS.tensors}
    assert {'expert_out'} | {f'{p}_hidden' for p, e in (('core', layer.core_experts), ('univ', layer.univ_experts))
                             if e is not None} <= names
    assert torch.equal(got, want)


class _RecordingSiLU(nn.Module):
    """An activation that keeps its input (as a user's probe might)."""

    def forward(self, t):
        self.last_input = t
        return F.silu(t)


class _AlwaysDropout(nn.Dropout):
    """Monte-Carlo dropout: drops in eval too."""

    def forward(self, t):
        return F.dropout(t, self.p, training=True)


class _Tracked(torch.Tensor):
    """A tensor subclass whose ops run through __torch_function__."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs)


class _Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t):
        return self.inner(t)


def _swap_act(layer):
    layer.core_experts.act = _RecordingSiLU()


def _mc_dropout(layer):
    for m in layer.modules():
        if isinstance(m, nn.Dropout):
            m.train()


def _always_dropout(layer):
    layer.core_experts.drop1 = _AlwaysDropout(0.5)


def _identity_drops(layer):
    layer.train()  # in training, with drop modules that have no p
    layer.core_experts.drop1 = layer.core_experts.drop2 = nn.Identity()


def _wrap_experts(layer):
    layer.core_experts = _Wrapped(layer.core_experts)


def _instance_forward(layer):
    layer.univ_experts.act.forward = torch.relu  # as accelerate's hooks replace forward on an instance


def _class_forward(layer, monkeypatch):
    monkeypatch.setattr(ExpertLinear, 'forward', lambda self, t: torch.baddbmm(self.bias.unsqueeze(1), t, -self.weight))


def _parameter_subclass(layer):
    for m in layer.modules():
        if isinstance(m, ExpertLinear):
            m.weight = nn.Parameter(m.weight.detach().as_subclass(_Tracked))
            m.bias = nn.Parameter(m.bias.detach().as_subclass(_Tracked))


def _parametrized(layer):
    from torch.nn.utils import parametrize
    parametrize.register_parametrization(layer.univ_experts.fc2, 'weight', nn.Identity())


def _expert_hook(layer):
    layer.core_experts.fc1.register_forward_hook(lambda m, args, out: setattr(m, 'kept', out))


def _compiled_experts(layer):
    layer.core_experts.compile(backend='eager')  # calls run the compiled code, not forward


def _instance_call_impl(layer):
    call = layer.univ_experts._call_impl
    layer.univ_experts._call_impl = lambda *args, **kwargs: call(*args, **kwargs)


def _routing_subclass(layer):
    layer.slot_query = nn.Parameter(layer.slot_query.detach().as_subclass(_Tracked))


@pytest.mark.parametrize('change', [
    _swap_act, _mc_dropout, _always_dropout, _identity_drops, _wrap_experts, _instance_forward, _class_forward,
    _parameter_subclass, _parametrized, _expert_hook, _compiled_experts, _instance_call_impl, _routing_subclass,
    'global hook', 'autocast', 'training dropout', 'function mode'])
def test_no_grad_experts_leave_the_buffers_to_what_forward_would_do_otherwise(change, monkeypatch):
    """The experts keep the plain path, fresh tensors and all, wherever ``forward_into`` would compute something
    else or a buffer could be seen and kept: an activation outside the GELU table, dropout that drops (Monte-Carlo,
    a replaced module, training), other drop modules, wrapped expert modules, a forward replaced on an instance or
    a class, tensor-subclass or parametrized weights, forward hooks on an expert module or global ones, compiled
    expert modules or an instance's own _call_impl, autocast, a torch-function mode; and a tensor-subclass slot
    query keeps the routing out of the buffers too. Outputs (values and type) equal the gradient-tracking path's; no expert buffer is made;
    a tensor an activation or hook kept is not overwritten by the next call."""
    import inspect
    from torch.overrides import TorchFunctionMode
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    layer = _layer(noise_mult=0., expert_drop=0.5).eval()
    x = torch.randn(2, 7, 16)
    ctx, undo = contextlib.nullcontext(), None
    if change == 'global hook':
        undo = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    elif change == 'autocast':
        ctx = torch.autocast('cpu', dtype=torch.bfloat16)
    elif change == 'training dropout':
        layer.train()
    elif change == 'function mode':
        class Recording(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                self.outs = getattr(self, 'outs', []) + [out]
                return out
        ctx = Recording()
    else:
        change(layer, *([monkeypatch] if 'monkeypatch' in inspect.signature(change).parameters else []))
    try:
        torch.manual_seed(1)
        with ctx:
            want = layer(x).detach()
        free_no_grad_buffers()
        torch.manual_seed(1)
        with torch.no_grad(), ctx:
            got = layer(x)
        used = {name for name, _, _ in NO_GRAD_BUFFERS.tensors} & {'expert_out', 'core_hidden', 'univ_hidden'}
        if change is _routing_subclass:  # the subclass would see the routing buffers too
            used |= {name for name, _, _ in NO_GRAD_BUFFERS.tensors}
        experts = layer.core_experts
        kept = getattr(getattr(experts, 'act', None), 'last_input', getattr(getattr(experts, 'fc1', None), 'kept', None))
        snapshot = None if kept is None else kept.clone()
        with torch.no_grad():
            layer(2 * x)  # a buffered call now would overwrite a buffer the activation or hook kept
    finally:
        if undo is not None:
            undo.remove()
    assert not used
    assert type(got) is type(want) and torch.equal(got, want)
    assert (kept is not None) == (change in (_swap_act, _expert_hook))
    assert kept is None or torch.equal(kept, snapshot)


@pytest.mark.parametrize('dim', [33, 50, 48])
def test_no_grad_experts_in_buffers_only_where_the_universal_rows_start_aligned(dim):
    """The universal experts write from m_core * B * d floats into the output buffer; MKL's results depend on the
    output's alignment and fresh tensors start on 64 bytes, so unaligned starts keep the plain path: outputs equal
    the gradient-tracking path's bit for bit for every batch size and slot count."""
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    for S in (1, 2):
        layer = _layer(dim=dim, slots_per_expert=S).eval()
        for B in (1, 2, 3, 4):
            x = torch.randn(B, 7, dim)
            want = layer(x).detach()
            free_no_grad_buffers()
            with torch.no_grad():
                got = layer(x)
            aligned = layer.num_core_experts * S * B * dim % 16 == 0
            assert torch.equal(got, want), (S, B)
            assert any(name == 'expert_out' for name, _, _ in NO_GRAD_BUFFERS.tensors) == aligned, (S, B)


def test_no_grad_expert_buffers_follow_the_weights_and_the_batch_size():
    """Expert groups whose hidden width is not the one they were built with (pruned, replaced fc1 / fc2) get
    buffers of their weights' width (no resize of a kept buffer, no warning); a call at another batch size frees
    every buffer of the old one, the experts' too, even when it uses only the routing buffers (autocast)."""
    import warnings
    from jetmoe_timm.layers import ExpertLinear, free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    layer = _layer(slots_per_expert=1).eval()
    experts = layer.core_experts
    experts.fc1, experts.fc2 = ExpertLinear(3, 16, 40), ExpertLinear(3, 40, 16)
    x = torch.randn(4, 7, 16)
    want = layer(x).detach()
    free_no_grad_buffers()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('error')
        assert torch.equal(layer(x), want) and torch.equal(layer(x), want)
    assert {shape for name, _, shape in NO_GRAD_BUFFERS.tensors if name == 'core_hidden'} == {(3, 4, 40)}
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x[:1])
    assert {batch for _, batch, _ in NO_GRAD_BUFFERS.tensors} == {1}


def test_no_grad_routing_buffers_stay_out_of_traces_transforms_and_fake_tensors():
    """Calls that would bake kept memory into a graph or fill it with tensors of another kind take fresh tensors:
    torch.jit.trace (its check runs under no_grad), torch.func.vmap, forward-mode AD, FakeTensorMode; a
    float64 default dtype does not change the float32 buffers."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    torch.manual_seed(0)
    layer = SpheroMoE(16, 3, 6).eval()
    x = torch.randn(2, 9, 16)
    traced = torch.jit.trace(layer, x)  # check_trace compares with a second trace made under no_grad
    with torch.no_grad():
        want = layer(x)
        assert torch.equal(traced(x), want) and torch.equal(traced(2 * x), layer(2 * x))
        assert torch.allclose(torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1), want, atol=1e-6)
    import torch.autograd.forward_ad as fwAD
    with torch.no_grad(), fwAD.dual_level():
        out = layer(fwAD.make_dual(x, torch.ones_like(x)))
        assert fwAD.unpack_dual(out).tangent is not None
    free_no_grad_buffers()
    with FakeTensorMode() as mode, torch.no_grad():
        layer_fake = SpheroMoE(16, 3, 6).eval()
        layer_fake(mode.from_tensor(x))
    assert not NO_GRAD_BUFFERS.tensors
    with torch.no_grad():
        assert type(layer(x)) is torch.Tensor
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        free_no_grad_buffers()
        with torch.no_grad():
            assert torch.equal(layer(x), want)
        assert all(t.dtype == torch.float32 for t in NO_GRAD_BUFFERS.tensors.values())
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize('routing', ['sphero', 'softmoe'])
def test_float64_layer_routes_in_float64(routing):
    """Routing widens bf16 / fp16 to float32 but never narrows float64: a float64 layer passes gradcheck (input,
    slot queries, temperatures), matches the float64 reference to float64 precision, captures float64 routing,
    and its no-grad calls leave the float32 routing buffers alone."""
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    layer = _layer(dim=6, num_core_experts=2, num_univ_experts=0 if routing == 'softmoe' else 2,
                   routing=routing).double().eval()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    q, t = (layer.get_parameter(n).detach().clone().requires_grad_() for n in ('slot_query', 'temp_raw'))
    assert torch.autograd.gradcheck(
        lambda x, q, t: torch.func.functional_call(layer, {'slot_query': q, 'temp_raw': t}, (x,)), (x, q, t))
    torch.testing.assert_close(layer(x), sphero_moe_reference(layer, x), atol=1e-12, rtol=1e-12)
    layer.capture_routing = True
    layer(x)
    assert all(v.dtype == torch.float64 for v in layer.last_routing.values())
    layer.capture_routing = False
    free_no_grad_buffers()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.detach()).detach())
    assert not NO_GRAD_BUFFERS.tensors


def test_no_grad_routing_buffers_keep_a_bounded_set_of_shapes():
    """Token counts that change at one batch size (dynamic_img_size ViTs, ConvNeXt at several resolutions) do not
    pile up routing buffers: each name keeps its four most recently used shapes, and another batch size replaces
    them all at once. A C-JetMoE with MoE blocks in all four stages cycles through four shapes on every forward:
    all stay, nothing is allocated again."""
    import timm
    from jetmoe_timm.layers import free_no_grad_buffers
    from jetmoe_timm.layers._eager_memory import NO_GRAD_BUFFERS
    assert NO_GRAD_BUFFERS.max_shapes == 4
    layer = _layer().eval()
    M = layer.num_slots

    def shapes():
        return sorted({shape for name, _, shape in NO_GRAD_BUFFERS.tensors if name == 'logits'})

    free_no_grad_buffers()
    with torch.no_grad():
        for n in range(3, 12):
            layer(torch.randn(2, n, 16))
        assert shapes() == [(2, n, M) for n in (8, 9, 10, 11)] and len(NO_GRAD_BUFFERS.tensors) == 12 + 3
        layer(torch.randn(2, 8, 16))  # used again: 9 is now the least recently used
        layer(torch.randn(2, 5, 16))
        assert shapes() == [(2, n, M) for n in (5, 8, 10, 11)]
        layer(torch.randn(3, 5, 16))  # another batch size: the old ones go at once
        assert shapes() == [(3, 5, M)]

    model = timm.create_model('c_jetmoe_femto', depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=2,
                              num_univ_experts=3, moe_blocks=(0, 1, 3, 4)).eval()  # one MoE block in every stage
    free_no_grad_buffers()
    with torch.no_grad():
        for size in (32, 64, 48, 96, 64):
            model(torch.randn(2, 3, size, size))
        ptrs = {k: v.data_ptr() for k, v in NO_GRAD_BUFFERS.tensors.items()}
        assert len(ptrs) == 24  # 6 names (routing, expert hidden and outputs) x the four stages' shapes at 64 px
        model(torch.randn(2, 3, 64, 64))
    assert {k: v.data_ptr() for k, v in NO_GRAD_BUFFERS.tensors.items()} == ptrs


def test_kept_gradient_memory_is_claimed_by_one_backward_at_a_time(monkeypatch):
    """Two threads running backward through one expert group at once (``keep_grad_memory``, no ``.grad`` yet) sum
    their gradients into ``.grad`` as the plain path does: one of them takes the kept buffer, the other a new
    tensor. Each thread waits for the other between checking the buffer free and writing it (the widest window
    a race can have; a thread that never checks goes on after a timeout)."""
    import threading
    from jetmoe_timm.layers import ExpertLinear, set_keep_grad_memory
    from jetmoe_timm.layers import experts
    torch.manual_seed(0)
    layer = ExpertLinear(2, 8, 8)
    set_keep_grad_memory(layer)
    xs = [torch.randn(2, 5, 8) for _ in range(2)]
    want = sum(torch.autograd.grad(torch.baddbmm(layer.bias.unsqueeze(1), x, layer.weight).square().sum(),
                                   layer.weight)[0] for x in xs)
    check = experts._storage_refs

    def check_then_wait(t):
        refs = check(t)
        try:
            both_checked.wait()
        except threading.BrokenBarrierError:
            pass  # the other thread found no buffer to check: it writes a new tensor
        return refs

    monkeypatch.setattr(experts, '_storage_refs', check_then_wait)
    for _ in range(3):
        layer.zero_grad(set_to_none=True)  # the kept buffer (from the second round on) is free
        outs = [layer(x).square().sum() for x in xs]
        both_checked, start, errors = threading.Barrier(2, timeout=0.25), threading.Barrier(2), []

        def run(out):
            start.wait()
            try:
                out.backward()
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(o,)) for o in outs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and torch.allclose(layer.weight.grad, want, rtol=1e-5, atol=1e-5)
        assert layer._grad_buffer is not None  # still kept for the next step
    monkeypatch.setattr(experts, '_storage_refs', check)
    layer.zero_grad(set_to_none=True)  # one thread again: the kept buffer becomes .grad, as before
    layer(xs[0]).square().sum().backward()
    assert layer.weight.grad.untyped_storage().data_ptr() == layer._grad_buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize('slots', [1, 2])
def test_empty_batch(slots):
    """A batch of no samples (B = 0) passes through, as through timm's dense layers: eval and training (whole
    expert drop, drop path), with and without gradients and routing buffers."""
    layer = _layer(slots_per_expert=slots, expert_drop=0.5, expert_drop_mode='expert', expert_drop_path=0.3)
    x = torch.randn(0, 5, 16)
    for train in (False, True):
        layer.train(train)
        for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with ctx():
                assert layer(x).shape == x.shape
    assert layer(torch.randn(0, 2, 3, 16)).shape == (0, 2, 3, 16)
    layer(x.requires_grad_()).sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize('name,kwargs', [
    ('v_jetmoe_tiny', dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)),
    ('c_jetmoe_femto', dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))),
])
def test_empty_batch_through_both_model_families(name, kwargs):
    import timm
    model = timm.create_model(name, num_core_experts=2, num_univ_experts=3, num_classes=3, **kwargs)
    x = torch.randn(0, 3, 32, 32)
    model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (0, 3)


def test_noise_follows_vmap_randomness():
    """Eager logit noise is ATen's plain sampler (the custom op that keeps it under torch.compile is for compiled
    calls only), so torch.func.vmap's randomness modes hold: 'error' refuses it, 'same' draws one noise for
    every sample, 'different' one per sample."""
    from torch.func import vmap
    layer = _layer(noise_mult=1.).train()
    x = torch.randn(1, 1, 5, 16).expand(4, 1, 5, 16).contiguous()  # 4 identical samples of (1, 5, 16)
    with pytest.raises(RuntimeError, match='randomness'):
        vmap(layer, randomness='error')(x)
    same = vmap(layer, randomness='same')(x)
    assert all(torch.allclose(same[0], s, atol=1e-6) for s in same[1:])
    different = vmap(layer, randomness='different')(x)
    assert not torch.allclose(different[0], different[1])


def test_explicit_noise_mult_overrides_the_preset():
    """Presets set defaults; explicit constructor arguments override them: 'softmoe' has no noise unless
    ``noise_mult`` is given, and an explicit 0 turns the other presets' noise off."""
    assert _layer(num_univ_experts=0, routing='softmoe').noise_mult == 0
    assert _layer(noise_mult=0.).noise_mult == 0 and _layer().noise_mult == 1 / 8
    layer = _layer(num_univ_experts=0, routing='softmoe', noise_mult=0.3).train()
    assert layer.noise_mult == 0.3
    x = torch.randn(2, 9, 16)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, layer(x))


def test_names_of_the_module_before_the_split_still_resolve():
    """Whole layers pickled before experts.py existed name their expert classes in sphero_moe; they load."""
    import pickle
    from jetmoe_timm.layers import ExpertLinear, ExpertMlp, free_no_grad_buffers
    for name, obj in (('ExpertLinear', ExpertLinear), ('ExpertMlp', ExpertMlp),
                      ('free_no_grad_buffers', free_no_grad_buffers)):
        assert pickle.loads(f'cjetmoe_timm.layers.sphero_moe\n{name}\n.'.encode()) is obj  # a GLOBAL opcode
