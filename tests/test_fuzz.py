"""Fuzzing the batched SpheroMoE layer against the plain looped reference over layer shapes and inputs.

Shapes, expert counts, slots, the core / universal split, routing presets, combine functions, temperatures and
input scales are drawn by hypothesis; every example must agree with ``sphero_moe_reference``. Bounded to a few
seconds (``max_examples`` 30); set ``JETMOE_FUZZ_EXAMPLES`` for a longer run.
"""
import os

import torch
from hypothesis import given, settings, strategies as st

from jetmoe_timm.layers import SpheroMoE, sphero_moe_reference

FUZZ = settings(max_examples=int(os.environ.get('JETMOE_FUZZ_EXAMPLES', 30)), deadline=None, database=None)


@st.composite
def layers(draw):
    """A SpheroMoE layer with random (non-trivial) parameters."""
    routing = draw(st.sampled_from(['sphero', 'official', 'softmoe']))
    core = draw(st.integers(0, 4))
    univ = 0 if routing == 'softmoe' else draw(st.integers(0 if core else 1, 5))
    core = max(core, 1) if routing == 'softmoe' else core
    kwargs = dict(
        dim=draw(st.integers(1, 24)),
        num_core_experts=core,
        num_univ_experts=univ,
        slots_per_expert=draw(st.integers(1, 3)),
        routing=routing,
        combine=draw(st.sampled_from([None, 'softmax', 'entmax15'])),
        core_hidden=draw(st.one_of(st.none(), st.integers(1, 40))),
        univ_ratio=draw(st.sampled_from([0.01, 0.25, 0.5, 1.0])),
    )
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    layer = SpheroMoE(**kwargs).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith('bias') or name.startswith('slot_norm'):
                p.normal_(std=0.5)
        # temperatures anywhere from the floor to soft
        layer.temp_raw.uniform_(-6., 3.)
    return layer


@st.composite
def inputs(draw, dim):
    B, N = draw(st.integers(1, 3)), draw(st.integers(1, 20))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.randn(B, N, dim, generator=g) * draw(st.sampled_from([1e-2, 1., 1e2]))
    if draw(st.booleans()):  # repeated tokens: ties in the dispatch softmax
        x[:, N // 2:] = x[:, :1]
    return x


def _close(actual, expected):
    scale = max(1., expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@FUZZ
@given(data=st.data())
def test_layer_matches_reference(data):
    layer = data.draw(layers())
    x = data.draw(inputs(layer.dim))
    with torch.no_grad():
        out = layer(x)
        _close(out, sphero_moe_reference(layer, x))
        # without noise and dropout, training mode computes the same function
        layer.noise_mult = 0.
        _close(layer.train()(x), out)


@FUZZ
@given(data=st.data())
def test_channels_last_maps_and_routing_distributions(data):
    layer = data.draw(layers())
    B, H, W = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x = torch.randn(B, H, W, layer.dim)
    layer.capture_routing = True
    with torch.no_grad():
        out = layer(x)
        r = layer.last_routing
        _close(out, sphero_moe_reference(layer, x.flatten(1, 2)).view_as(x))
    torch.testing.assert_close(r['dispatch'].sum(1), torch.ones(B, layer.num_slots))
    torch.testing.assert_close(r['combine'].sum(-1), torch.ones(B, H * W))
    _close(r['core_out'] + r['univ_out'], out.flatten(1, 2))
