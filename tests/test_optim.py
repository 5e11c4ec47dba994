"""AdafactorLean: timm's Adafactor update, computed in slices, registered with timm's optimizer factory."""
import copy
import math

import pytest
import timm
import torch
from timm.optim import Adafactor, create_optimizer_v2
from torch.profiler import ProfilerActivity, profile

import jetmoe_timm.optim
from jetmoe_timm.optim import AdafactorLean


class _AccurateAdafactor(Adafactor):
    """timm's Adafactor with the clipping RMS accumulated in float64: timm's float32 norm is off by up to ~1e-3
    relative on tensors of millions of elements, AdafactorLean's per-slice sums added as doubles are not;
    everything else is timm's."""

    @staticmethod
    def _rms(tensor):
        return (tensor.double().square().sum() / tensor.numel()).sqrt().to(tensor.dtype)


# every factoring timm chooses: experts (E, in, out) with E > 16 -> dims (0, 1); E <= 16 -> (1, 2); a matrix; a conv
# (out, in, kh, kw) -> (0, 1); and unfactored tensors (vectors, small matrices)
SHAPES = [(20, 24, 40), (8, 24, 40), (40, 24), (32, 20, 3, 3), (40,), (8, 8), (0, 24, 40)]  # and an empty one


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]


@pytest.mark.parametrize('weight_decay', [0., 0.05])
@pytest.mark.parametrize('slice_bytes', [64, 1 << 22])  # many slices (a row or a few each), or one
def test_same_update_as_timm(monkeypatch, weight_decay, slice_bytes):
    monkeypatch.setattr(jetmoe_timm.optim, '_SLICE_BYTES', slice_bytes)
    ref, lean = _params(0), _params(0)
    opt_ref = _AccurateAdafactor(ref, lr=1e-2, weight_decay=weight_decay)
    opt_lean = AdafactorLean(lean, lr=1e-2, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ref, lean):
            # gradients of growing size: the last steps are clipped (update RMS > clip_threshold), the first not
            a.grad = torch.randn(a.shape, generator=g) * 10. ** (step - 2)
            b.grad = a.grad.clone()
        before = [p.detach().clone() for p in ref]
        opt_ref.step()
        opt_lean.step()
        for a, b, p0 in zip(ref, lean, before):
            torch.testing.assert_close(b - p0, a - p0, rtol=1e-5, atol=1e-8)  # atol: an ulp of the weights
            b.data.copy_(a)  # each step compared from the same weights
    for sr, sl in zip(opt_ref.state.values(), opt_lean.state.values()):
        assert sr.keys() == sl.keys()  # timm's state, key for key: checkpoints move between the two
        for k in ('exp_avg_sq_row', 'exp_avg_sq_col', 'exp_avg_sq'):
            if k in sr:
                torch.testing.assert_close(sl[k], sr[k], rtol=1e-5, atol=0)
        assert sl['step'] == sr['step'] == 4


def test_allocates_nothing_parameter_sized():
    """The point of the class: no temporary the size of a large parameter (timm's step makes several)."""
    p = torch.nn.Parameter(torch.randn(64, 128, 256) * 0.02)  # 8 MB
    p.grad = torch.randn_like(p)
    largest = {}
    for name, cls in (('timm', Adafactor), ('lean', AdafactorLean)):
        q = copy.deepcopy(p)
        q.grad = p.grad.clone()
        opt = cls([q], lr=1e-3, weight_decay=0.05)
        opt.step()  # the state exists
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
        largest[name] = max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    size = p.numel() * 4
    assert largest['timm'] >= size and largest['lean'] <= 8 << 20 and largest['lean'] < size


def test_other_options_run_timms_step():
    """A first moment (betas), lr=None's relative step and bf16 weights are timm's own update, exactly."""
    for kwargs, dtype in ((dict(lr=1e-2, betas=(0.9, 0.999)), torch.float32), (dict(lr=None), torch.float32),
                          (dict(lr=1e-2), torch.bfloat16)):
        ref, lean = _params(0), _params(0)
        for a, b in zip(ref, lean):
            a.data = a.data.to(dtype)
            b.data = b.data.to(dtype)
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        Adafactor(ref, **kwargs).step()
        AdafactorLean(lean, **kwargs).step()
        assert all(torch.equal(a, b) for a, b in zip(ref, lean)), kwargs


def test_step_with_a_closure_chooses_its_path_from_the_closures_gradients():
    """step(closure) decides between its sliced update and timm's once the closure has made the gradients: the
    same weights and state as gradients set before step(); bf16 weights take timm's update (float32 state)."""
    for dtype in (torch.float32, torch.bfloat16):
        before, closed = _params(0), _params(0)
        grads = [torch.randn(p.shape, dtype=dtype) for p in before]
        for a, b, g in zip(before, closed, grads):
            a.data, b.data = a.data.to(dtype), b.data.to(dtype)
            a.grad = g.clone()
        AdafactorLean(before, lr=1e-2).step()

        def closure():
            for q, g in zip(closed, grads):
                q.grad = g.clone()
            return torch.tensor(1.)
        opt = AdafactorLean(closed, lr=1e-2)
        assert opt.step(closure) == 1.
        assert all(torch.equal(a, b) for a, b in zip(before, closed)), dtype
        assert all(t.dtype == torch.float32 for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def test_registered_with_timm(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)
    opt = create_optimizer_v2(model, 'adafactorlean', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert type(opt) is AdafactorLean and len(opt.param_groups) > 2  # timm's weight decay and layer-decay groups
    x = torch.randn(2, 3, tiny_vit_kwargs['img_size'], tiny_vit_kwargs['img_size'])
    experts = model.blocks[-1].mlp.core_experts.fc1.weight
    before = experts.detach().clone()
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(experts, before) and math.isfinite(experts.sum().item())
    assert 'adafactorlean' in timm.optim.list_optimizers()


def test_step_hooks_run_once_on_timms_path():
    """The fallback runs timm's step body, not its hook wrapper a second time."""
    Adafactor(_params(0), lr=1e-2)  # an Adafactor made first: torch wraps Adafactor.step with its hook runner too
    calls = []
    for kwargs in (dict(lr=1e-2), dict(lr=1e-2, betas=(0.9, 0.999))):  # the sliced path, then timm's
        params = _params(0)
        for p in params:
            p.grad = torch.ones_like(p)
        opt = AdafactorLean(params, **kwargs)
        opt.register_step_pre_hook(lambda *a: calls.append('pre'))
        opt.register_step_post_hook(lambda *a: calls.append('post'))
        opt.step()
    assert calls == ['pre', 'post'] * 2


def _step_peak_bytes(fn) -> int:
    """Peak of the tensor bytes allocated during ``fn`` over what was live before (profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == '[memory]'):
        live += nbytes
        peak = max(peak, live)
    return peak


def test_step_in_backward_is_the_same_training_without_the_gradients(tiny_vit_kwargs):
    """step_in_backward=True: each parameter updated as its gradient arrives, the gradient freed at once; the same
    weights as backward + step, step by step, and no moment where every gradient is held."""
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs, num_classes=5)
    models = {'step': model, 'in_backward': copy.deepcopy(model)}
    opts = {k: create_optimizer_v2(m, 'adafactorlean', lr=1e-2, weight_decay=0.05, layer_decay=0.75,
                                   step_in_backward=k == 'in_backward') for k, m in models.items()}
    x = torch.randn(4, 3, tiny_vit_kwargs['img_size'], tiny_vit_kwargs['img_size'])
    y = torch.randint(0, 5, (4,))
    for _ in range(3):
        for k, m in models.items():
            torch.manual_seed(1)  # the same logit noise and dropout in both
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if k == 'in_backward':
                assert all(p.grad is None for p in m.parameters())  # used and freed during backward
            opts[k].step()
            opts[k].zero_grad()
        for (name, a), b in zip(models['step'].named_parameters(), models['in_backward'].parameters()):
            assert torch.equal(a, b), name

    # the gradients are never all alive: weights-heavy layers, small activations
    big = {k: torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]) for k in ('step', 'in_backward')}
    opts = {k: AdafactorLean(m.parameters(), lr=1e-3, step_in_backward=k == 'in_backward') for k, m in big.items()}
    peaks = {}
    for k, m in big.items():
        def train_step(m=m, opt=opts[k]):
            m(torch.randn(2, 512)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        train_step()  # the state exists
        peaks[k] = _step_peak_bytes(train_step)
    grads = sum(p.numel() * 4 for p in big['step'].parameters())  # 4.2 MB
    assert peaks['step'] >= grads and peaks['step'] - peaks['in_backward'] >= grads / 2, peaks  # one layer's at a time


@pytest.mark.filterwarnings('ignore:Using backward')  # torch's note on create_graph=True
def test_step_in_backward_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match='external lr, no betas'):
        AdafactorLean(_params(0), lr=1e-2, betas=(0.9, 0.999), step_in_backward=True)
    with pytest.raises(ValueError, match='dense float32'):
        AdafactorLean([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], lr=1e-2, step_in_backward=True)
    with pytest.raises(ValueError, match="True or False, not 'false'"):  # train.py's --opt-kwargs gives strings
        AdafactorLean(_params(0), lr=1e-2, step_in_backward='false')
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdafactorLean([p], lr=1e-2, step_in_backward=True)
    with pytest.raises(RuntimeError, match='create_graph'):  # a gradient that is part of a graph is not a step
        (p * p).sum().backward(create_graph=True)
    p.grad = None
    with pytest.raises(ValueError, match='already updated in backward by another'):  # one owner at a time
        AdafactorLean([p], lr=1e-2, step_in_backward=True)
    opt.remove_hooks()
    AdafactorLean([p], lr=1e-2, step_in_backward=True)  # dropped at once: nothing holds it

    # a dense weight with sparse gradients (nn.Embedding(sparse=True)): refused before any state is made
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdafactorLean(emb.parameters(), lr=1e-2, step_in_backward=True)
    with pytest.raises(RuntimeError, match='dense float32 gradients; a \\(10, 4\\) weight got a torch.sparse_coo'):
        emb(torch.tensor([1, 2])).sum().backward()
    assert not opt.state

    # a resumed state whose options the hooks cannot run (timm's Adafactor with betas): refused before loading
    params = _params(0)
    saved = Adafactor(params, lr=1e-2, betas=(0.9, 0.999)).state_dict()
    opt = AdafactorLean(params, lr=1e-2, step_in_backward=True)
    with pytest.raises(ValueError, match='betas, caution or lr=None.*resume it without step_in_backward'):
        opt.load_state_dict(saved)
    assert all(g['beta1'] is None for g in opt.param_groups)
    opt.param_groups[0]['beta1'] = 0.9  # changed by hand later: the hook refuses rather than ignore it
    with pytest.raises(RuntimeError, match='has been changed'):
        sum((q * q).sum() for q in params).backward()


def test_step_in_backward_follows_the_optimizer():
    """The hooks read the groups the optimizer has at each backward (load_state_dict replaces them, schedulers set
    their lr) and end with the optimizer."""
    def backward_moves(params):
        before = [q.detach().clone() for q in params]
        sum((q * q).sum() for q in params).backward()
        return any(not torch.equal(a, b) for a, b in zip(params, before))

    params = _params(0)
    opt = AdafactorLean(params, lr=1e-2, step_in_backward=True)
    assert backward_moves(params)
    state = opt.state_dict()
    opt.remove_hooks()
    resumed = AdafactorLean(params, lr=1e-2, step_in_backward=True)
    resumed.load_state_dict(state)  # what train.py's --resume does before its scheduler sets the lr
    for group in resumed.param_groups:
        group['lr'] = 0.
    assert not backward_moves(params)
    assert all(resumed.state[q]['step'] == 2 for q in params if q.numel())
    del resumed  # its hooks end with it: the gradient stays for whatever optimizer comes next
    assert not backward_moves(params) and all(q.grad is not None for q in params)
