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
import threading
import weakref
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GELU, GELUTanh, drop_path, register_notrace_module, trunc_normal_
from torch.nn.modules import module as _nn_module
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

from .entmax import entmax15

__all__ = ['ExpertLinear', 'ExpertMlp', 'SpheroMoE', 'ROUTING_PRESETS', 'set_keep_grad_memory',
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


class _NoGradBuffers(threading.local):
    """Float32 buffers for the temporaries of no-grad CPU calls, one set per thread, shared by every SpheroMoE layer
    (layers run one after another and these tensors die with the call): the (B, N, M) routing tensors, and, where
    the experts run in them (``SpheroMoE._experts_in_buffers``), their hidden activations and outputs. Each buffer
    name keeps at most ``max_shapes`` shapes, the most recently used, all of one batch size: a C-JetMoE with MoE
    blocks in all four stages cycles through four shapes on every forward (fewer kept, each would be evicted just
    before its next use), and inputs of changing sizes (dynamic_img_size ViTs, ConvNeXt at several resolutions)
    must not pile up one set per size.

    Fresh tensors of this size (7.4 MB each at batch 32 for V-JetMoE-T's routing) are served by glibc from pages it
    has just handed back to the kernel, so every call page-faults them in again; in V-JetMoE-T inference the
    routing tensors cost ~4 % of the model's time in float32 and ~15 % under bf16 autocast.
    """

    max_shapes = 4  # shapes kept per buffer name: one per ConvNeXt stage

    def __init__(self):
        # (name, batch, shape) -> buffer, in order of use: a name's most recently used shape comes last
        self.tensors: Dict[Tuple[str, int, Tuple[int, ...]], torch.Tensor] = {}
        self.busy = False  # handed out to a call still running: a nested call takes fresh tensors

    def get(self, name: str, shape: Tuple[int, ...], batch: Optional[int] = None) -> torch.Tensor:
        """A float32 buffer of ``shape`` for a call at batch size ``batch`` (default: ``shape[0]``)."""
        batch = shape[0] if batch is None else batch
        key = (name, batch, shape)
        t = self.tensors.pop(key, None)
        if t is None:
            # another batch size: every buffer of the old one goes at once (whatever its name: a call that uses
            # fewer names must not leave the others held); otherwise this name's least recently used beyond max_shapes
            stale = [k for k in self.tensors if k[1] != batch]
            kept = [k for k in self.tensors if k[0] == name and k[1] == batch]
            for k in stale + kept[:max(0, len(kept) - self.max_shapes + 1)]:
                del self.tensors[k]
            with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
                t = torch.empty(shape, dtype=torch.float32, device='cpu')
        self.tensors[key] = t  # (re)inserted last: the most recently used
        return t


_NO_GRAD_BUFFERS = _NoGradBuffers()


def free_no_grad_buffers() -> None:
    """Free this thread's buffers of no-grad SpheroMoE calls (the routing tensors, up to 3 x B x N x M float32, and
    the experts' hidden activations and outputs, for each of at most four shapes; 44 MB per shape at batch 32 for
    V-JetMoE-T). They are made again by the next no-grad call."""
    _NO_GRAD_BUFFERS.tensors.clear()


@torch.jit.ignore
def _plain_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain tensor: a tensor subclass (parameters, a slot norm of its own) must see fresh
    tensors, not the kept buffers, and gives its own type to the output."""
    return type(t) is torch.Tensor


def _plain_eager_call(x: torch.Tensor) -> bool:
    """An eager call on a plain tensor: not compiled, traced, transformed (torch.func), under forward-mode AD or
    under a dispatch mode (FakeTensorMode and the like). Only such calls may read or fill memory kept between
    calls: anything else would bake it into a graph or hand out tensors of another kind."""
    return (_plain_tensor(x) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active() and torch._C._len_torch_dispatch_stack() == 0
            and getattr(torch.autograd.forward_ad, '_current_level', -1) < 0)


def _no_function_modes() -> bool:
    """No torch-function mode but ``with torch.device(...)``'s: a mode sees every op's tensors and may keep them."""
    return (not torch._C._is_torch_function_mode_enabled()
            or all(type(m) is DeviceContext for m in _get_current_function_mode_stack()))


def _global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module are active (``nn.modules.module.register_module_forward_*``)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


# the activations ExpertMlp.forward_into applies in place: type -> GELU approximation (nn.GELU: its own attribute)
_GELU_APPROXIMATE = {nn.GELU: None, GELU: 'none', GELUTanh: 'tanh'}


# claims and returns of ExpertLinear's kept gradient memory: backward passes of two threads may reach one module
_GRAD_BUFFER_LOCK = threading.Lock()


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s storage (tensors and storage objects), or a large number where torch cannot say."""
    count = getattr(torch._C, '_storage_Use_Count', None)
    return count(t.untyped_storage()._cdata) - 1 if count is not None else 1 << 30  # less the temporary here


class _ExpertLinearFn(torch.autograd.Function):
    """``baddbmm(bias, x, weight)`` whose weight gradient is written into memory kept from one step to the next.

    A core expert group's weight gradient (98 x 192 x 768 floats, 58 MB) is above glibc's largest mmap threshold
    (32 MB): allocated fresh every backward, its pages are faulted in anew each step. The kept buffer is reused
    only when nothing else holds it: the parameter has no ``.grad`` (set to None since the last step) and no
    other tensor shares its storage; otherwise the gradient is a new tensor, so accumulation, ``autograd.grad``
    and gradients a caller kept are never overwritten. A backward takes the buffer out of its module while it
    checks and writes it, so a backward of another thread at the same time finds none and writes a new tensor.
    Autograd receives a tensor of its own on the buffer's storage, which it takes as ``.grad`` without a copy.
    With ``create_graph`` the plain, differentiable matmul is used.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, owner):
        ctx.save_for_backward(x, weight)
        ctx.owner = owner
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, weight.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled() or weight.grad is not None:  # double backward, or accumulating
                grad_w = torch.bmm(x.transpose(1, 2), grad)
            else:
                owner = ctx.owner
                with _GRAD_BUFFER_LOCK:  # claim it: checked free and written by this call alone
                    buf, owner._grad_buffer = owner._grad_buffer, None
                if buf is None or buf.shape != weight.shape or buf.dtype != grad.dtype or _storage_refs(buf) != 1:
                    buf = torch.empty_like(weight, dtype=grad.dtype)
                torch.bmm(x.transpose(1, 2), grad, out=buf)
                grad_w = buf.new_empty(0).set_(buf.untyped_storage(), buf.storage_offset(), buf.shape, buf.stride())
                with _GRAD_BUFFER_LOCK:  # kept for the next step (not when switched off meanwhile)
                    if owner.keep_grad_memory:
                        owner._grad_buffer = buf
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(1)
        return grad_x, grad_w, grad_b, None


class ExpertLinear(nn.Module):
    """E independent linear maps run as one batched matmul.

    weight (E, in, out), bias (E, out); input (E, T, in) -> output (E, T, out).

    ``keep_grad_memory`` (off by default; ``set_keep_grad_memory``): write the weight gradient into memory kept
    across steps instead of a fresh buffer, which saves the page faults of a fresh 58 MB buffer per core expert
    group and step on CPU (the SpheroMoE layer's forward+backward ~15 % faster) at the cost of holding one
    weight-gradient-sized buffer through the next forward, when ``zero_grad(set_to_none=True)`` would have freed it
    (0.97 GB for V-JetMoE-T, +0.86 GB at the peak of its training step at batch 64).

    ``cache_autocast_weights`` (off by default; ``set_autocast_weight_cache``): in eval mode without gradients
    under CPU or CUDA autocast, keep the weight and bias cast to autocast's dtype from one call to the next.
    Autocast casts them again on every call (its own cache ends with each autocast region), which for expert
    groups is much of the work at small batches: V-JetMoE-T reads 1 GB of float32 expert weights per batch. The
    copy (half the weights' bytes in bf16) is made again when the weight is another tensor or its version
    counter moved, and dropped by any forward with gradients, ``train()``, ``.to()`` and pickling. Off by default
    because writes that bypass the version counter (``.data``, ``.numpy()`` views, fused optimizer steps, another
    process writing shared memory) would leave it stale until one of those.
    """
    keep_grad_memory: bool = False
    cache_autocast_weights: bool = False
    _grad_buffer: Optional[torch.Tensor] = None  # the kept weight-gradient memory
    _autocast_copy: Optional[Tuple[Tuple, torch.Tensor, torch.Tensor]] = None  # (key, weight, bias) cast
    __jit_ignored_attributes__ = ['_autocast_copy']  # eager-only; TorchScript cannot type its key

    def __init__(self, num_experts: int, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features, **dd))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        trunc_normal_(self.weight, std=.02)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if torch.is_grad_enabled():
                self._autocast_copy = None  # gradients on: the weights may be trained from here on
                if self._keeps_grad_memory(x):
                    return self._forward_keeping_grad_memory(x)
            elif self._uses_autocast_copy(x):
                weight, bias = self._autocast_weights(x.device.type)
                return torch.baddbmm(bias.unsqueeze(1), x, weight)
            elif self._casts_for_autocast(x):
                # Cast here, not by autocast: autocast keeps its casts of parameters until its region ends, so a
                # forward under no_grad holds every expert group's copy at once and gets them as fresh memory on
                # every call; cast per call, each copy is freed after its matmul. The same values as autocast's.
                dtype = torch.get_autocast_dtype(x.device.type)
                return torch.baddbmm(self.bias.to(dtype).unsqueeze(1), x, self.weight.to(dtype))
        # bias add fused into the batched matmul
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)

    @torch.jit.unused
    def _keeps_grad_memory(self, x: torch.Tensor) -> bool:
        """Whether this call can use the kept gradient memory: a plain eager CPU float step of a leaf weight."""
        return (self.keep_grad_memory and torch.is_grad_enabled() and self.weight.requires_grad
                and self.weight.is_leaf and x.device.type == 'cpu' and x.dtype == self.weight.dtype
                and not torch.is_autocast_enabled('cpu') and _plain_eager_call(x))

    @torch.jit.unused
    def _forward_keeping_grad_memory(self, x: torch.Tensor) -> torch.Tensor:
        return _ExpertLinearFn.apply(x, self.weight, self.bias, self)

    @torch.jit.unused
    def _uses_autocast_copy(self, x: torch.Tensor) -> bool:
        """Whether this call reads the kept autocast copy: a call that casts the weights itself (below), in eval
        without gradients, with autocast's own cache on and the copy switched on; not during CUDA graph capture."""
        if not (self.cache_autocast_weights and not self.training and not torch.is_grad_enabled()
                and self._casts_for_autocast(x) and torch.is_autocast_cache_enabled()):
            return False
        return not (x.device.type == 'cuda' and torch.cuda.is_current_stream_capturing()) \
            and not self.weight.is_inference()

    @torch.jit.unused
    def _casts_for_autocast(self, x: torch.Tensor) -> bool:
        """Whether this no-grad call casts the weights itself: eager, not traced or transformed, CPU / CUDA autocast
        on (both list baddbmm among the ops they cast), plain float32 parameters (autocast leaves float64 alone,
        and keeps only its casts of float32 parameters)."""
        if not _plain_eager_call(x):  # first: an FX proxy or a compiled call never reaches the autocast queries
            return False
        device = x.device.type
        return device in ('cpu', 'cuda') and torch.is_autocast_enabled(device) and self._plain_float32_parameters()

    @torch.jit.unused
    def _plain_float32_parameters(self) -> bool:
        """Registered float32 parameters of the plain class: not parametrized (those are computed anew on every
        access), not a tensor subclass (its ops must see every call)."""
        w, b = self._parameters.get('weight'), self._parameters.get('bias')
        return type(w) is nn.Parameter and type(b) is nn.Parameter and w.dtype == torch.float32

    @torch.jit.unused
    def _autocast_weights(self, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias in autocast's dtype, cast once per change of the weights: the key holds the tensors
        themselves (weakly: a new tensor at a freed one's address is another tensor), their storage and versions."""
        dtype = torch.get_autocast_dtype(device)
        w, b = self.weight, self.bias
        state = (dtype, w.data_ptr(), w._version, b.data_ptr(), b._version)
        copy = self._autocast_copy  # read once: another thread may replace it meanwhile
        if copy is None or copy[0][0] != state or copy[0][1]() is not w or copy[0][2]() is not b:
            # a normal tensor even under inference_mode, so later no_grad calls outside it may read it too
            with torch.inference_mode(False), torch.no_grad():
                copy = ((state, weakref.ref(w), weakref.ref(b)), w.to(dtype), b.to(dtype))
            self._autocast_copy = copy
        return copy[1], copy[2]

    def train(self, mode: bool = True):
        if mode:
            self._autocast_copy = None  # training changes the weights: the copy would only hold memory
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): the kept memory would be dead weight
        self._grad_buffer = self._autocast_copy = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        # new weights; and the copy's weak references to them would stop torch.utils.swap_tensors, which
        # load_state_dict uses under torch.__future__.set_swap_module_params_on_conversion(True)
        self._autocast_copy = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # copies and pickles do not take the kept memory along
        return dict(super().__getstate__(), _grad_buffer=None, _autocast_copy=None)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}'


def _set_expert_linears(module: nn.Module, flag: str, memory: str, enable: bool) -> None:
    for m in module.modules():
        if isinstance(m, ExpertLinear):
            setattr(m, flag, enable)
            if not enable:
                setattr(m, memory, None)


def set_keep_grad_memory(module: nn.Module, enable: bool = True) -> None:
    """Switch the kept weight-gradient memory of every expert group in ``module`` on or off (see
    ``ExpertLinear``): faster CPU training steps for one expert-gradient-sized buffer held through the forward."""
    _set_expert_linears(module, 'keep_grad_memory', '_grad_buffer', enable)


def set_autocast_weight_cache(module: nn.Module, enable: bool = True) -> None:
    """Switch the expert groups' autocast weight copies in ``module`` on or off (the default), freeing them (see
    ``ExpertLinear``): faster autocast inference for a copy of the expert weights in autocast's dtype."""
    _set_expert_linears(module, 'cache_autocast_weights', '_autocast_copy', enable)


class ExpertMlp(nn.Module):
    """A group of E expert MLPs (fc1 -> act -> drop -> fc2 -> drop), all computed at once.

    Input (E, T, d) -> output (E, T, d): expert e sees the T rows x[e].
    """

    def __init__(
            self,
            num_experts: int,
            dim: int,
            hidden_features: int,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.hidden_features = hidden_features
        self.fc1 = ExpertLinear(num_experts, dim, hidden_features, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = ExpertLinear(num_experts, hidden_features, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

    @torch.jit.unused
    def _runs_in_buffers(self) -> bool:
        """Whether ``forward_into`` computes this group's ``forward``: the library's own modules (ExpertLinear with
        plain float32 parameters of shapes that chain, a GELU of ``_GELU_APPROXIMATE``, nn.Dropout not dropping),
        each running its class's own ``forward`` (see ``_runs_own_forward``). Anything else could compute something
        other than what ``forward_into`` does, or see and keep a buffer."""
        if not (type(self.fc1) is ExpertLinear and type(self.fc2) is ExpertLinear
                and self.fc1._plain_float32_parameters() and self.fc2._plain_float32_parameters()):
            return False
        E, dim, hidden = self.fc1.weight.shape  # shapes that do not chain: the plain path says what is wrong
        drops = (self.drop1, self.drop2)
        return (E == self.num_experts and self.fc2.weight.shape == (E, hidden, dim)
                and self.fc1.bias.shape == (E, hidden) and self.fc2.bias.shape == (E, dim)
                and type(self.act) in _GELU_APPROXIMATE and all(type(m) is nn.Dropout for m in drops)
                and not any(m.training and m.p > 0 for m in drops)
                and all(_runs_own_forward(m) for m in (self, self.fc1, self.act, self.drop1, self.fc2, self.drop2)))

    @torch.jit.unused
    def forward_into(self, x: torch.Tensor, out: torch.Tensor, hidden: torch.Tensor) -> None:
        """``forward`` of a no-grad float32 call (see ``_runs_in_buffers``) written into ``out`` (E, T, d), with the
        hidden activations in ``hidden`` (E, T, hidden_features); the same values bit for bit. GELU runs in place
        on them (a fresh (E, T, hidden) tensor page-faults on every call)."""
        torch.baddbmm(self.fc1.bias.unsqueeze(1), x, self.fc1.weight, out=hidden)
        approximate = _GELU_APPROXIMATE[type(self.act)] or self.act.approximate
        torch.ops.aten.gelu_(hidden, approximate=approximate)
        torch.baddbmm(self.fc2.bias.unsqueeze(1), hidden, self.fc2.weight, out=out)


# each module class's own forward, as defined: a forward replaced later (on the class, or on an instance as
# accelerate's hooks do) is not what ExpertMlp.forward_into computes
_OWN_FORWARD = {cls: cls.forward for cls in (ExpertMlp, ExpertLinear, nn.GELU, GELU, GELUTanh, nn.Dropout)}


def _runs_own_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's own forward, as defined, without forward hooks: not replaced on
    the class or the instance, not compiled (``module.compile()`` runs its compiled code instead), no ``_call_impl``
    of the instance's own."""
    return (_OWN_FORWARD.get(type(module)) is type(module).forward and 'forward' not in vars(module)
            and '_call_impl' not in vars(module) and getattr(module, '_compiled_call_impl', None) is None
            and not (module._forward_hooks or module._forward_pre_hooks))


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
            self.temp_raw.fill_(self._temp_to_raw(self.temperature_init))
        if isinstance(self.slot_norm, nn.LayerNorm):
            self.slot_norm.reset_parameters()

    def _temp_to_raw(self, t: float) -> float:
        """Inverse of the softplus parametrisation."""
        if t <= self.temperature_min:
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
        if not torch.jit.is_scripting() and in_buffers and _plain_tensor(query) and _plain_tensor(inv_temp):
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
        if (torch.is_grad_enabled() or x.device.type != 'cpu' or self.capture_routing or _NO_GRAD_BUFFERS.busy
                or torch.promote_types(x.dtype, torch.float32) != torch.float32
                or self._adds_noise() or not _plain_eager_call(x) or not _no_function_modes()):
            return False
        _NO_GRAD_BUFFERS.busy = True
        return True

    @torch.jit.unused
    def _forward_in_buffers(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(x, True)
        finally:
            _NO_GRAD_BUFFERS.busy = False

    @torch.jit.unused
    def _routing_weights_in_buffers(
            self, key: torch.Tensor, query: torch.Tensor, inv_temp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_routing_weights`` without noise, written into this thread's buffers: the same values, bit for bit."""
        shape = (key.shape[0], key.shape[1], self.num_slots)
        logits = _NO_GRAD_BUFFERS.get('logits', shape)
        if key.dtype == torch.float32 and not torch.is_autocast_enabled('cpu'):
            torch.matmul(key, query.t(), out=logits)
        else:  # autocast skips out= variants: let it run the matmul in its dtype, then widen into the buffer
            logits.copy_(key @ query.t())
        dispatch = torch.softmax(logits, 1, out=_NO_GRAD_BUFFERS.get('dispatch', shape))
        if self.temp_raw.shape[0] != 1:
            logits.mul_(inv_temp[1] / inv_temp[0])  # the dispatch weights are taken: cos / t_combine in place
        if self.combine == 'entmax15':
            return dispatch, entmax15(logits, dim=-1)
        return dispatch, torch.softmax(logits, -1, out=_NO_GRAD_BUFFERS.get('combine', shape))

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
        if (not _plain_tensor(slots) or slots.dtype != torch.float32 or torch.is_autocast_enabled('cpu')
                or _global_forward_hooks()):
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
        y = _NO_GRAD_BUFFERS.get('expert_out', (self.num_slots, B, d), B)
        for name, experts, rows, out in (('core', self.core_experts, core_in, y[:core_in.shape[0]]),
                                         ('univ', self.univ_experts, univ_in, y[core_in.shape[0]:])):
            if experts is not None:
                E, _, hidden_width = experts.fc1.weight.shape
                hidden = _NO_GRAD_BUFFERS.get(f'{name}_hidden', (E, S * B, hidden_width), B)
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
            y = (y.view(self.num_experts, S, B, d) * mask / keep).view(self.num_slots, B, d)

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
        """{'core': the core experts, 'univ': the universal experts}, the paths that hold experts (a path of none is
        None); a path's module is ``<path>_experts``."""
        groups = {'core': self.core_experts, 'univ': self.univ_experts}
        return {path: group for path, group in groups.items() if group is not None}

    def extra_repr(self) -> str:
        return (
            f'dim={self.dim}, core={self.num_core_experts}x{self.core_hidden}, '
            f'univ={self.num_univ_experts}x{self.univ_hidden}, slots_per_expert={self.slots_per_expert}, '
            f'routing={self.routing}, combine={self.combine}')
