""" Memory that the SpheroMoE layers keep between eager CPU calls, and when a call may use it.

Fresh tensors of tens of MB come back from glibc as pages it has just returned to the kernel, so every call
page-faults them in again. No-grad calls write their temporaries into per-thread buffers instead
(``NO_GRAD_BUFFERS``); the predicates here say when that is safe: only eager calls on plain tensors, where no
graph, transform, mode or hook could see or keep the memory.
"""
import threading
from typing import Dict, Optional, Tuple

import torch
from torch.nn.modules import module as _nn_module
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

__all__ = ['NO_GRAD_BUFFERS', 'free_no_grad_buffers', 'global_forward_hooks', 'no_function_modes', 'plain_eager_call',
           'plain_tensor']


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


NO_GRAD_BUFFERS = _NoGradBuffers()


def free_no_grad_buffers() -> None:
    """Free this thread's buffers of no-grad SpheroMoE calls (the routing tensors, up to 3 x B x N x M float32, and
    the experts' hidden activations and outputs, for each of at most four shapes; 44 MB per shape at batch 32 for
    V-JetMoE-T). They are made again by the next no-grad call."""
    NO_GRAD_BUFFERS.tensors.clear()


@torch.jit.ignore
def plain_tensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain tensor: a tensor subclass (parameters, a slot norm of its own) must see fresh
    tensors, not the kept buffers, and gives its own type to the output."""
    return type(t) is torch.Tensor


def plain_eager_call(x: torch.Tensor) -> bool:
    """An eager call on a plain tensor: not compiled, traced, transformed (torch.func), under forward-mode AD or
    under a dispatch mode (FakeTensorMode and the like). Only such calls may read or fill memory kept between
    calls: anything else would bake it into a graph or hand out tensors of another kind."""
    return (plain_tensor(x) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active() and torch._C._len_torch_dispatch_stack() == 0
            and getattr(torch.autograd.forward_ad, '_current_level', -1) < 0)


def no_function_modes() -> bool:
    """No torch-function mode but ``with torch.device(...)``'s: a mode sees every op's tensors and may keep them."""
    return (not torch._C._is_torch_function_mode_enabled()
            or all(type(m) is DeviceContext for m in _get_current_function_mode_stack()))


def global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module are active
    (``nn.modules.module.register_module_forward_*``)."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)
