""" SpheroMoE: the soft mixture-of-experts layer of MoE Jetpack (Zhu et al., NeurIPS 2024).

Tokens and slot queries meet on the unit sphere: routing logits are cosine similarities between the
L2-normalised tokens and the LayerNormed + L2-normalised slot queries, divided by two learnable
temperatures (dispatch and combine). Each slot is a softmax-over-tokens mixture of the input tokens; a few
large *core* experts and many small *universal* experts process the slots; every token reads back a mixture
of all expert outputs (softmax, or 1.5-entmax as in the official code, over all slots).

Shapes: B batch, N tokens, d channels, E experts of a path, S slots per expert, M = (E_core + E_univ) * S.

Deviations from the official MMPretrain code (see docs/deviations.md for the reasoning):
  * logit noise is added in training only (the official code also adds it at inference, a bug);
    ``noise_at_eval=True`` restores that behaviour.
  * combine is softmax by default (the paper's equation, no sparse kernel); ``combine='entmax15'`` and the
    ``routing='official'`` preset give the official sparse combine.
  * temperatures are kept positive by a softplus parametrisation with a floor (the official raw scalars can
    reach zero or flip sign); the initial value is the official 0.5.
  * expert weights use timm's ViT init (trunc normal 0.02) rather than the official kaiming init on the
    3-D tensor, whose bound is far too small for training from scratch.
  * expert drop path scales the layer output per sample; this is exactly the official drop path on the
    stacked expert outputs, since combine is linear in them, but cheaper.
"""
import math
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import drop_path, register_notrace_module

from ._eager_memory import NO_GRAD_BUFFERS, global_forward_hooks, no_function_modes, plain_eager_call, plain_tensor
from ._eager_memory import free_no_grad_buffers
from .entmax import entmax15
from .experts import ExpertLinear, ExpertMlp, set_autocast_weight_cache, set_keep_grad_memory

# the expert names too: they lived here before experts.py, and imports and pickles of whole models name this module
__all__ = ['SpheroMoE', 'ROUTING_PRESETS', 'ExpertLinear', 'ExpertMlp', 'set_keep_grad_memory',
           'set_autocast_weight_cache', 'free_no_grad_buffers']


# Routing presets: each names the options it sets; explicit constructor arguments override them.
ROUTING_PRESETS: Dict[str, Dict] = {
    # MoE Jetpack SpheroMoE as this library recommends it (paper equations, official normalisation)
    'sphero': dict(slot_norm=True, num_temperatures=2, combine='softmax', noise=True),
    # the official dual-path layer: sparse 1.5-entmax combine (noise at eval stays opt-in)
    'official': dict(slot_norm=True, num_temperatures=2, combine='entmax15', noise=True),
    # plain Soft MoE (Puigcerver et al.): one learnable scale, softmax both ways, no noise, no slot norm
    'softmoe': dict(slot_norm=False, num_temperatures=1, combine='softmax', noise=False),
}


# nondeterministic_seeded: a compiled graph never runs it twice for one draw (activation checkpointing recomputes
# deterministic ops in backward: the gradients would belong to other noise than the forward's)
@torch.library.custom_op('jetmoe_timm::normal_like', mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _normal_like(like: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``like``, from ATen's vectorised sampler."""
    return torch.empty_like(like).normal_(0., std)


@_normal_like.register_fake
def _(like, std):
    return torch.empty_like(like)


def _logit_noise(logits: torch.Tensor, std: float) -> torch.Tensor:
    """Routing noise. Compiled on CPU it is an opaque op, so that torch.compile keeps ATen's sampler: inductor's own
    per-element RNG is about 10x slower there (~140 ms vs 13 ms for the (64, 197, 294) logits of v_jetmoe_tiny).
    Eager calls use the plain sampler (the same draws), which torch.func.vmap's randomness modes know about.
    """
    if logits.device.type == 'cpu' and torch.compiler.is_compiling():
        return torch.ops.jetmoe_timm.normal_like(logits.detach(), std)
    return torch.empty_like(logits).normal_(0., std)

# a leaf for torch.fx (timm's FX feature extraction): routing branches on training mode, device and shapes
@register_notrace_module
class SpheroMoE(nn.Module):
    """SpheroMoE layer: cosine soft routing into a dual path of core and universal experts.

    Input (B, N, d) tokens or a channels-last (B, H, W, d) map; output has the input's shape.
    """

    def __init__(
            self,
            dim: int,
            num_core_experts: int = 98,
            num_univ_experts: int = 196,
            core_hidden: Optional[int] = None,
            univ_ratio: float = 0.25,
            slots_per_expert: int = 1,
            routing: str = 'sphero',
            combine: Optional[str] = None,
            noise_mult: Optional[float] = None,
            noise_at_eval: bool = False,
            temperature_init: Optional[float] = None,
            temperature_min: float = 1e-2,
            expert_drop: float = 0.,
            expert_drop_mode: str = 'element',
            expert_drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: token channels d.
            num_core_experts: number of large (core) experts.
            num_univ_experts: number of small (universal) experts; must be 0 for ``routing='softmoe'``.
            core_hidden: hidden width of a core expert (default 4 * dim).
            univ_ratio: universal expert hidden width as a fraction of core_hidden (paper: 1/4).
            slots_per_expert: slots S routed to each expert.
            routing: preset, one of ``ROUTING_PRESETS`` ('sphero', 'official', 'softmoe').
            combine: 'softmax' or 'entmax15' (default: the preset's).
            noise_mult: std of the Gaussian logit noise (default 1 / number of experts, 0 for 'softmoe'; 0 disables
                it).
            noise_at_eval: also add noise in eval mode, as the official code does.
            temperature_init: initial temperatures (default 0.5 for two temperatures, 1.0 for softmoe's one).
            temperature_min: floor of the temperatures, which keeps them positive.
            expert_drop: dropout rate inside the experts (official: 0.4, element-wise).
            expert_drop_mode: 'element' (official) or 'expert' (paper: drop whole expert outputs per sample).
            expert_drop_path: per-sample stochastic depth on the layer output.
            act_layer: expert activation.
        """
        super().__init__()
        if routing not in ROUTING_PRESETS:
            raise ValueError(f"Unknown routing preset '{routing}'; choose one of {sorted(ROUTING_PRESETS)}.")
        preset = ROUTING_PRESETS[routing]
        combine = combine or preset['combine']
        if combine not in ('softmax', 'entmax15'):
            raise ValueError(f"Unknown combine '{combine}'; choose 'softmax' or 'entmax15'.")
        if expert_drop_mode not in ('element', 'expert'):
            raise ValueError(f"Unknown expert_drop_mode '{expert_drop_mode}'; choose 'element' or 'expert'.")
        if routing == 'softmoe' and num_univ_experts:
            raise ValueError("routing='softmoe' is single-path: set num_univ_experts=0.")
        if num_core_experts < 0 or num_univ_experts < 0 or num_core_experts + num_univ_experts == 0:
            raise ValueError(
                f'Need at least one expert, got num_core_experts={num_core_experts}, '
                f'num_univ_experts={num_univ_experts}.')
        if slots_per_expert < 1:
            raise ValueError(f'slots_per_expert must be >= 1, got {slots_per_expert}.')
        dd = {'device': device, 'dtype': dtype}
        core_hidden = core_hidden or 4 * dim
        univ_hidden = max(1, int(round(core_hidden * univ_ratio)))

        self.dim = dim
        self.routing = routing
        self.combine = combine
        self.num_core_experts = num_core_experts
        self.num_univ_experts = num_univ_experts
        self.num_experts = num_core_experts + num_univ_experts
        self.slots_per_expert = slots_per_expert
        self.num_slots = self.num_experts * slots_per_expert
        self.core_hidden = core_hidden
        self.univ_hidden = univ_hidden
        if noise_mult is None:  # the preset decides only the default: an explicit value always holds
            noise_mult = 1. / self.num_experts if preset['noise'] else 0.
        self.noise_mult = noise_mult
        self.noise_at_eval = noise_at_eval
        self.temperature_min = temperature_min
        self.expert_drop_mode = expert_drop_mode
        self.expert_drop = expert_drop
        self.expert_drop_path = expert_drop_path
        self.norm_eps = 1e-6
        self.capture_routing = False
        self.last_routing: Optional[Dict[str, torch.Tensor]] = None

        num_temps = preset['num_temperatures']
        if temperature_init is None:  # not `or`: an explicit 0 is refused by reset_parameters, not replaced
            temperature_init = 0.5 if num_temps == 2 else 1.0
        self.temperature_init = temperature_init
        self.slot_query = nn.Parameter(torch.empty(self.num_experts, slots_per_expert, dim, **dd))
        self.slot_norm = nn.LayerNorm(dim, **dd) if preset['slot_norm'] else nn.Identity()
        # softplus parametrisation: temperature = temperature_min + softplus(temp_raw) stays > 0 with a live grad
        self.temp_raw = nn.Parameter(torch.empty(num_temps, **dd))

        element_drop = expert_drop if expert_drop_mode == 'element' else 0.
        self.core_experts = ExpertMlp(
            num_core_experts, dim, core_hidden, act_layer=act_layer, drop=element_drop, **dd,
        ) if num_core_experts else None
        self.univ_experts = ExpertMlp(
            num_univ_experts, dim, univ_hidden, act_layer=act_layer, drop=element_drop, **dd,
        ) if num_univ_experts else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal slot queries (as the official code), temperatures at their initial value."""
        if self.slot_query.is_meta:
            return
        with torch.no_grad():
            # drawn in float32 at least: the QR behind orthogonal_ has no CPU kernel for 16-bit floats
            q = torch.randn_like(self.slot_query, dtype=torch.promote_types(self.slot_query.dtype, torch.float32))
            nn.init.orthogonal_(q)
            self.slot_query.copy_(q)
            self.temp_raw.fill_(self.temperature_to_raw(self.temperature_init))
        if isinstance(self.slot_norm, nn.LayerNorm):
            self.slot_norm.reset_parameters()

    def temperature_to_raw(self, t: float) -> float:
        """The ``temp_raw`` value of temperature ``t``: the inverse of ``temperature``'s softplus parametrisation."""
        if not t > self.temperature_min:  # NaN too
            raise ValueError(f'temperature {t} must exceed temperature_min={self.temperature_min}.')
        v = t - self.temperature_min
        return v + math.log(-math.expm1(-v))  # log(expm1(v)), stable for large v

    @property
    def temperature(self) -> torch.Tensor:
        """Effective temperatures (dispatch, combine); one shared value for 'softmoe'."""
        return self.temperature_min + F.softplus(self.temp_raw)

    def _unit_query(self) -> torch.Tensor:
        """Slot queries, LayerNormed and L2-normalised: (M, d)."""
        query = self.slot_norm(self.slot_query).flatten(0, 1)
        return query / (torch.linalg.vector_norm(query, dim=-1, keepdim=True) + self.norm_eps)

    def _unit_key(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens L2-normalised: (B, N, d). A multiply by the (B, N, 1) inverse norm has a cheaper backward
        than a broadcast divide (fewer passes over the (B, N, d) tokens)."""
        return x * (1. / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.norm_eps))

    def routing_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of tokens and slot queries: (B, N, d) -> (B, N, M)."""
        return self._unit_key(x) @ self._unit_query().t()

    def _adds_noise(self) -> bool:
        """Whether this call adds logit noise: in training, or at eval too with ``noise_at_eval``."""
        return self.noise_mult > 0 and (self.training or self.noise_at_eval)

    def _routing_weights(self, x: torch.Tensor, in_buffers: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dispatch weights (softmax over tokens) and combine weights (over slots), both (B, N, M) float32 (float64
        for float64 inputs), written into this thread's no-grad buffers when ``in_buffers`` (see
        ``_claims_no_grad_buffers``).

        The logits matmul runs in the input's (or autocast's) dtype; the temperatures, the noise and both
        normalisations run in float32 or wider, where bf16 would visibly distort the weights of ~300 slots.
        """
        # bf16 / fp16 widened to float32; float64 stays float64 (gradcheck, numerical studies)
        routing_dtype = torch.promote_types(x.dtype, torch.float32)
        inv_temp = 1. / self.temperature.to(routing_dtype)
        key = self._unit_key(x)
        # 1 / t_dispatch is folded into the (M, d) query, not applied to the much larger (B, N, M) logits
        query = self._unit_query() * inv_temp[0].to(x.dtype)
        if not torch.jit.is_scripting() and in_buffers and plain_tensor(query) and plain_tensor(inv_temp):
            return self._routing_weights_in_buffers(key, query, inv_temp)
        logits = (key @ query.t()).to(routing_dtype)  # cos / t_dispatch
        noisy = self._adds_noise()
        if self.temp_raw.shape[0] == 1:  # one shared temperature: both directions read the same logits
            if noisy:
                logits = logits + _logit_noise(logits, self.noise_mult)
            dispatch_logits = logits
            combine_logits = logits
        else:
            ratio = inv_temp[1] / inv_temp[0]  # cos / t_combine = ratio * (cos / t_dispatch)
            if noisy:
                noise = _logit_noise(logits, self.noise_mult)  # one draw for both, as officially
                combine_logits = torch.addcmul(noise, logits, ratio)
                dispatch_logits = logits + noise
            else:
                combine_logits = logits * ratio
                dispatch_logits = logits
        dispatch = dispatch_logits.softmax(dim=1)  # over tokens: each slot is a convex mixture of tokens
        if self.combine == 'entmax15':
            combine = entmax15(combine_logits, dim=-1)
        else:
            combine = combine_logits.softmax(dim=-1)  # over all slots, for each token
        return dispatch, combine

    @torch.jit.unused
    def _claims_no_grad_buffers(self, x: torch.Tensor) -> bool:
        """Whether this call takes this thread's no-grad buffers (and marks them taken): a no-grad plain eager
        CPU call without noise whose routing runs in float32 (the buffers' dtype; not float64) and whose routing
        tensors do not outlive it (routing capture keeps them), while no other call holds them (a hook inside the
        experts may run another layer)."""
        if (torch.is_grad_enabled() or x.device.type != 'cpu' or self.capture_routing or NO_GRAD_BUFFERS.busy
                or torch.promote_types(x.dtype, torch.float32) != torch.float32
                or self._adds_noise() or not plain_eager_call(x) or not no_function_modes()):
            return False
        NO_GRAD_BUFFERS.busy = True
        return True

    @torch.jit.unused
    def _forward_in_buffers(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x, True)
        finally:
            NO_GRAD_BUFFERS.busy = False

    @torch.jit.unused
    def _routing_weights_in_buffers(
            self, key: torch.Tensor, query: torch.Tensor, inv_temp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_routing_weights`` without noise, written into this thread's buffers: the same values, bit for bit."""
        shape = (key.shape[0], key.shape[1], self.num_slots)
        logits = NO_GRAD_BUFFERS.get('logits', shape)
        if key.dtype == torch.float32 and not torch.is_autocast_enabled('cpu'):
            torch.matmul(key, query.t(), out=logits)
        else:  # autocast skips out= variants: let it run the matmul in its dtype, then widen into the buffer
            logits.copy_(key @ query.t())
        dispatch = torch.softmax(logits, 1, out=NO_GRAD_BUFFERS.get('dispatch', shape))
        if self.temp_raw.shape[0] != 1:
            logits.mul_(inv_temp[1] / inv_temp[0])  # the dispatch weights are taken: cos / t_combine in place
        if self.combine == 'entmax15':
            return dispatch, entmax15(logits, dim=-1)
        return dispatch, torch.softmax(logits, -1, out=NO_GRAD_BUFFERS.get('combine', shape))

    def _run_experts(self, slots: torch.Tensor, in_buffers: bool = False) -> torch.Tensor:
        """Both expert paths on the slots: (B, M, d) -> expert-major outputs (M, B, d).

        With one slot per expert (all registered models), each path reads its slots through a strided (E, B, d)
        view of the batch-major tensor, a layout the batched matmul takes as it is: nothing is copied on the way
        in. With S > 1 slots, expert e's rows are ordered s * B + b and gathering them costs one copy.
        ``in_buffers``: this call holds the no-grad buffers (see ``_experts_in_buffers``).
        """
        B, d = slots.shape[0], slots.shape[-1]  # d spelled out: a -1 cannot be inferred from 0 elements (B = 0)
        S = self.slots_per_expert
        buffered = not torch.jit.is_scripting() and in_buffers and self._experts_in_buffers(slots)
        slots = slots.transpose(0, 1)  # (M, B, d) view; slot m = e * S + s
        m_core = self.num_core_experts * S
        # split (not two slices): its backward writes both gradients into one buffer instead of summing two
        # zero-padded full-size ones
        core_in, univ_in = slots.split([m_core, self.num_slots - m_core], dim=0)
        if buffered:
            return self._run_experts_in_buffers(core_in, univ_in, B)
        outs: List[torch.Tensor] = []
        if self.core_experts is not None:
            outs.append(self.core_experts(core_in.reshape(self.num_core_experts, S * B, d)).view(m_core, B, d))
        if self.univ_experts is not None:
            univ_out = self.univ_experts(univ_in.reshape(self.num_univ_experts, S * B, d))
            outs.append(univ_out.view(self.num_slots - m_core, B, d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    @torch.jit.unused
    def _experts_in_buffers(self, slots: torch.Tensor) -> bool:  # slots (B, M, d)
        """Whether the experts of this buffered call run in the no-grad buffers too: plain float32 slots without
        autocast, the universal experts' rows starting 64-byte aligned, no global forward hooks, and expert groups
        that ``ExpertMlp.forward_into`` computes exactly (``ExpertMlp._runs_in_buffers``)."""
        if (not plain_tensor(slots) or slots.dtype != torch.float32 or torch.is_autocast_enabled('cpu')
                or global_forward_hooks()):
            return False
        # the universal rows start m_core * B * d floats into the output buffer: MKL's results depend on the output's
        # alignment, and fresh tensors start on 64 bytes, so an unaligned start would not be bit for bit the same
        if self.num_core_experts and self.num_univ_experts and (self.num_core_experts * self.slots_per_expert
                                                                * slots.shape[0] * slots.shape[-1]) % 16:
            return False
        return all(experts is None or (type(experts) is ExpertMlp and experts._runs_in_buffers())
                   for experts in (self.core_experts, self.univ_experts))

    @torch.jit.unused
    def _run_experts_in_buffers(self, core_in: torch.Tensor, univ_in: torch.Tensor, B: int) -> torch.Tensor:
        """``_run_experts`` written into the no-grad buffers: (M, B, d), the same values bit for bit. Each path
        writes its rows of the output buffer directly (no concatenation) and its hidden activations into a
        buffer of its own, where the activation runs in place."""
        S, d = self.slots_per_expert, core_in.shape[-1]
        y = NO_GRAD_BUFFERS.get('expert_out', (self.num_slots, B, d), B)
        for name, experts, rows, out in (('core', self.core_experts, core_in, y[:core_in.shape[0]]),
                                         ('univ', self.univ_experts, univ_in, y[core_in.shape[0]:])):
            if experts is not None:
                E, _, hidden_width = experts.fc1.weight.shape
                hidden = NO_GRAD_BUFFERS.get(f'{name}_hidden', (E, S * B, hidden_width), B)
                experts.forward_into(rows.reshape(E, S * B, d), out.view(E, S * B, d), hidden)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._claims_no_grad_buffers(x):
            return self._forward_in_buffers(x)
        return self._forward(x, False)

    def _forward(self, x: torch.Tensor, in_buffers: bool) -> torch.Tensor:
        shape = x.shape
        x = x.flatten(1, -2)  # channels-last maps become token sequences; (B, N, d) is unchanged
        B = x.shape[0]

        dispatch, combine = self._routing_weights(x, in_buffers)
        slots = torch.bmm(dispatch.transpose(1, 2).to(x.dtype), x)  # (B, M, d)
        y = self._run_experts(slots, in_buffers)  # (M, B, d)
        if self.training and self.expert_drop_mode == 'expert' and self.expert_drop > 0.:
            keep = 1. - self.expert_drop
            S, d = self.slots_per_expert, y.shape[-1]
            mask = torch.empty(self.num_experts, 1, B, 1, device=y.device, dtype=y.dtype).bernoulli_(keep)
            y = y.view(self.num_experts, S, B, d) * mask
            if keep > 0.:  # rate 1 drops every expert: zeros, as nn.Dropout(1.) gives, not 0 / 0
                y = y / keep
            y = y.view(self.num_slots, B, d)

        out = torch.bmm(combine.to(y.dtype), y.transpose(0, 1))  # (B, N, d); y read in place, not permuted
        if self.expert_drop_path > 0. and self.training:
            out = drop_path(out, self.expert_drop_path, self.training)
        if self.capture_routing:
            self._capture(dispatch, combine, y)
        return out.reshape(shape)

    @torch.jit.unused
    def _capture(self, dispatch: torch.Tensor, combine: torch.Tensor, y: torch.Tensor) -> None:
        """Keep the last pass's routing for inspection (see ``jetmoe_timm.routing_info``)."""
        m_core = self.num_core_experts * self.slots_per_expert
        dtype = torch.promote_types(combine.dtype, torch.float32)  # float32, or float64 for a float64 layer
        y = y.detach().to(dtype).transpose(0, 1)  # (B, M, d)
        combine = combine.detach().to(dtype)
        core_out = combine[..., :m_core] @ y[:, :m_core]
        univ_out = combine[..., m_core:] @ y[:, m_core:]
        # each slot's share of each image's output: || sum_n combine[b, n, m] * y[b, m] || (combine >= 0)
        slot_contrib = combine.sum(1) * torch.linalg.vector_norm(y, dim=-1)
        self.last_routing = dict(
            dispatch=dispatch.detach().to(dtype),  # (B, N, M), sums to 1 over N
            combine=combine,  # (B, N, M), sums to 1 over M
            core_out=core_out,  # (B, N, d)
            univ_out=univ_out,  # (B, N, d); core_out + univ_out = layer output (before drop path)
            slot_contrib=slot_contrib,  # (B, M)
        )

    @torch.jit.unused
    def expert_groups(self) -> Dict[str, ExpertMlp]:
        """{'core': the core experts, 'univ': the universal experts}, the paths that hold experts (a path without
        any is left out: its ``<path>_experts`` is None); a path's module is ``<path>_experts``."""
        groups = {'core': self.core_experts, 'univ': self.univ_experts}
        return {path: group for path, group in groups.items() if group is not None}

    def extra_repr(self) -> str:
        return (
            f'dim={self.dim}, core={self.num_core_experts}x{self.core_hidden}, '
            f'univ={self.num_univ_experts}x{self.univ_hidden}, slots_per_expert={self.slots_per_expert}, '
            f'routing={self.routing}, combine={self.combine}')
