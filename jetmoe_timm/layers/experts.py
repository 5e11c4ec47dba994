""" Expert groups: E independent linear maps or MLPs computed as one batched matmul each.

``ExpertLinear`` (weight (E, in, out)) and ``ExpertMlp`` (fc1 -> act -> fc2 per expert) are what a SpheroMoE path
runs its slots through. Two opt-in speed-ups that hold memory between calls live here too: the kept
weight-gradient memory (``set_keep_grad_memory``) and the kept autocast weight copies
(``set_autocast_weight_cache``); and ``ExpertMlp.forward_into``, the no-grad float32 forward written into the
layer's kept buffers.
"""
import threading
import weakref
from typing import Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import GELU, GELUTanh, trunc_normal_

from ._eager_memory import plain_eager_call

__all__ = ['ExpertLinear', 'ExpertMlp', 'set_autocast_weight_cache', 'set_keep_grad_memory']


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
                and not torch.is_autocast_enabled('cpu') and plain_eager_call(x))

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
        if not plain_eager_call(x):  # first: an FX proxy or a compiled call never reaches the autocast queries
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
