""" AdafactorLean: timm's Adafactor without full-size temporaries, registered with timm as ``--opt adafactorlean``.

timm's Adafactor keeps little state (a row and a column vector per factored matrix), but each step makes several
fresh tensors the size of the parameter (the squared gradient, the update, its negation). For expert groups (58 MB
each in V-JetMoE-T, 231 MB in V-JetMoE-S) glibc maps those anew and page-faults them on every step: on 2 CPU cores
its step over V-JetMoE-T's 0.99 GB of weights takes 0.9-1.3 s against 0.11 s for fused AdamW (docs/training.md,
section 7).

``AdafactorLean`` computes the same update (timm's defaults: no first moment, an external learning rate) reading
each large parameter in slices of about 4 MB along its first dimension, so its temporaries stay in cache: three
reads of the gradient and one pass over the weight, nothing allocated at the size of an expert group (a
parameter whose first dimension is short, e.g. (1, 1024, 2048), still gets slices of one row). That is a
CPU fix: on a GPU the caching allocator already reuses timm's temporaries, so GPU parameters take timm's own step,
and so does anything else it does not cover (a first moment, ``lr=None``'s relative step, cautious updates,
low-precision or sparse gradients). The state is timm's, key for key: checkpoints move between ``adafactor``
and ``adafactorlean``.
"""
import inspect
import math
import weakref
from typing import Iterator, List, Tuple

import torch
from timm.optim import Adafactor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ['AdafactorLean', 'register_optimizers']

_SLICE_BYTES = 4 << 20  # gradient bytes per slice: the slice's temporaries stay in cache
# parameter -> the AdafactorLean (weakly) that updates it in backward: one at a time (keyed by identity: tensors
# compare elementwise)
_IN_BACKWARD_OWNER = WeakIdKeyDictionary()


def _remove_handles(handles: List) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _slices(t: torch.Tensor) -> Iterator[Tuple[int, int]]:
    """(start, end) ranges along dim 0 of a matrix or larger of about _SLICE_BYTES each on the CPU; one range on a
    GPU, whose caching allocator reuses whole-tensor temporaries and where each slice would cost kernel launches."""
    if t.device.type != 'cpu':
        yield 0, t.shape[0]
        return
    step = max(1, _SLICE_BYTES // max(1, t[0].numel() * t.element_size()))
    for start in range(0, t.shape[0], step):
        yield start, min(start + step, t.shape[0])


def _owner(p: torch.Tensor):
    """The live AdafactorLean that updates ``p`` in backward, or None."""
    ref = _IN_BACKWARD_OWNER.get(p)
    return ref() if ref is not None else None


def _plain_update(group) -> bool:
    """Whether the group asks for the update ``_update`` computes: an external lr, no first moment, no caution."""
    # .get: optimizer states saved by a timm without cautious updates have no 'caution'
    return not group['relative_step'] and group['beta1'] is None and not group.get('caution', False)


def _rows(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start:end of a factor broadcast along dim 0 (a size-1 dim 0 is shared by every slice)."""
    return t if t.shape[0] == 1 else t[start:end]


class AdafactorLean(Adafactor):
    """timm's ``Adafactor`` (same arguments, state and update) computed in cache-sized slices; see the module
    docstring. Use it as ``create_optimizer_v2(model, 'adafactorlean', lr=...)`` or train.py ``--opt adafactorlean``.

    ``step_in_backward=True`` (train.py: ``--opt-kwargs step_in_backward=True``) updates each parameter as soon as
    backward has accumulated its gradient and frees the gradient at once, so the weights' gradients never exist all
    at once: V-JetMoE-S / C-JetMoE-T fine-tune without their 3.9 / 5.8 GB of float32 gradients. ``step()`` then has
    nothing left to do. Every backward through the parameters becomes an update, so nothing may act between
    backward and step: no gradient clipping, no gradient accumulation, no loss scaling (fp16 AMP), no DDP (its
    all-reduce runs after the hook), no ``set_keep_grad_memory`` (it would keep the expert gradients anyway), no
    parameter shared by two reentrant-checkpointed segments; it needs an external lr, no first moment and no
    cautious updates. The hooks follow the optimizer: the learning rates its groups have at each backward (also
    after ``load_state_dict`` and under a scheduler); they end with it (``del``) or with ``remove_hooks()``, and a
    parameter takes one such optimizer at a time. Its parameters cannot be swapped
    (``torch.__future__.set_swap_module_params_on_conversion(True)``, off by default and in train.py): a swap
    would drop the hooks, and torch refuses it.
    """
    step_in_backward: bool = False

    def __init__(self, params, *args, step_in_backward: bool = False, **kwargs):
        if not isinstance(step_in_backward, bool):  # '--opt-kwargs step_in_backward=false' arrives as a string
            raise ValueError(f'step_in_backward takes True or False, not {step_in_backward!r}.')
        super().__init__(params, *args, **kwargs)
        self.step_in_backward = step_in_backward
        self.defaults['step_in_backward'] = step_in_backward  # shown where timm logs the optimizer's settings
        self._hook_handles: List = []
        if not step_in_backward:
            return
        if not all(_plain_update(g) for g in self.param_groups):
            raise ValueError('step_in_backward=True takes an external lr, no betas and no caution.')
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            raise ValueError('step_in_backward=True cannot run under DDP: each process would update its weights from '
                             'its own gradient before the all-reduce.')
        params = [p for group in self.param_groups for p in group['params'] if p.requires_grad]
        if any(p.dtype != torch.float32 or p.layout != torch.strided for p in params):
            raise ValueError('step_in_backward=True updates dense float32 weights (bf16 autocast is fine, bf16 weights '
                             'are not).')
        if any(_owner(p) is not None for p in params):
            raise ValueError('a parameter is already updated in backward by another AdafactorLean('
                             'step_in_backward=True): drop that one first (del it, or call its remove_hooks()).')
        owner = weakref.ref(self)  # the hooks must not keep the optimizer alive

        def hook(p, owner=owner):
            opt = owner()
            if opt is not None:
                opt._update_in_backward(p)
        for p in params:
            _IN_BACKWARD_OWNER[p] = owner
            self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))
        weakref.finalize(self, _remove_handles, self._hook_handles)

    def remove_hooks(self) -> None:
        """Stop updating in backward (``step()`` updates from then on)."""
        _remove_handles(self._hook_handles)
        for group in self.param_groups:
            for p in group['params']:
                if _owner(p) is self:
                    del _IN_BACKWARD_OWNER[p]
        self.step_in_backward = False

    def _group_of(self, p: torch.Tensor):
        """``p``'s parameter group now: ``load_state_dict`` replaces the group dicts."""
        key = tuple(map(id, self.param_groups))
        if getattr(self, '_groups_key', None) != key:
            self._groups = {id(q): g for g in self.param_groups for q in g['params']}
            self._groups_key = key
        return self._groups[id(p)]

    def load_state_dict(self, state_dict) -> None:
        # the saved group options replace this optimizer's: refuse those the hooks cannot run, before any is loaded
        if self.step_in_backward and not all(_plain_update(g) for g in state_dict['param_groups']):
            raise ValueError('this optimizer state has betas, caution or lr=None, which step_in_backward=True cannot '
                             'run: resume it without step_in_backward.')
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def _update_in_backward(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        if grad.requires_grad:  # backward(create_graph=True): the gradient is part of a graph
            raise RuntimeError('step_in_backward=True cannot update inside a backward with create_graph=True.')
        group = self._group_of(p)
        # checked before any state is made: a sparse gradient comes from a dense weight (nn.Embedding(sparse=True)),
        # and group options may have been changed since __init__
        if grad.layout != torch.strided or grad.dtype != torch.float32:
            raise RuntimeError(f'step_in_backward=True updates from dense float32 gradients; a {tuple(p.shape)} '
                               f'weight got a {grad.layout} {grad.dtype} one (nn.Embedding(sparse=True)?).')
        if not _plain_update(group):
            raise RuntimeError('step_in_backward=True takes an external lr, no betas and no caution; a parameter '
                               'group has been changed to one of them.')
        self._update(p, group)
        p.grad = None

    @staticmethod
    def _sliced(group) -> bool:
        """Whether the group's update is one this class computes in slices (else timm's step runs)."""
        return (_plain_update(group)
                and all(p.grad is None or (p.device.type == 'cpu' and p.dtype == torch.float32
                                           and p.grad.dtype == torch.float32 and p.grad.layout == torch.strided)
                        for p in group['params']))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # first: which path runs depends on the gradients the closure makes
            with torch.enable_grad():
                loss = closure()
        if not all(self._sliced(group) for group in self.param_groups):
            # timm's body: Adafactor.step may carry torch's step-hook wrapper too, and the hooks ran on this call
            inspect.unwrap(Adafactor.step)(self)
            return loss
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group) -> None:
        grad, state = p.grad, self.state[p]
        factored, _ = self._get_options(group, grad.shape, min_size_to_factor=group['min_dim_size_to_factor'])
        if not state:
            state['step'] = 0
            if factored is not None:
                dim_col, dim_row = factored
                state['exp_avg_sq_row'] = grad.new_zeros(grad.shape[:dim_row] + grad.shape[dim_row + 1:])
                state['exp_avg_sq_col'] = grad.new_zeros(grad.shape[:dim_col] + grad.shape[dim_col + 1:])
            else:
                state['exp_avg_sq'] = torch.zeros_like(grad)
            state['RMS'] = 0
        state['step'] += 1
        if grad.numel() == 0:  # nothing to update (timm's step changes nothing either)
            return
        # state['RMS'] (the weight's RMS) only scales lr=None's relative step, which takes timm's own path
        lr, eps, clip, wd = group['lr'], group['eps'], group['clip_threshold'], group['weight_decay']
        beta2t = 1.0 - math.pow(state['step'], group['decay_rate'])
        if factored is None:  # vectors and small matrices: timm's update, their temporaries are small
            exp_avg_sq = state['exp_avg_sq']
            exp_avg_sq.lerp_(grad * grad + eps, 1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
            update.div_((self._rms(update) / clip).clamp_(min=1.0)).mul_(lr)
            if wd != 0:
                p.add_(p, alpha=-wd * lr)
            p.add_(-update)
            return

        dim_col, dim_row = factored  # dim_col < dim_row, so dim 0 is either dim_col or kept by both means
        row, col = state['exp_avg_sq_row'], state['exp_avg_sq_col']
        # pass 1: the means of grad^2 over dim_row and dim_col (timm: mean of grad^2 + eps)
        row_mean = torch.zeros_like(row)
        col_mean = torch.zeros_like(col)
        for start, end in _slices(grad):
            sq = grad[start:end].square()
            for mean, dim in ((row_mean, dim_row), (col_mean, dim_col)):
                part = sq.sum(dim)
                if dim == 0:
                    mean.add_(part)
                else:
                    mean[start:end] = part
        row.lerp_(row_mean.div_(grad.shape[dim_row]).add_(eps), 1.0 - beta2t)
        col.lerp_(col_mean.div_(grad.shape[dim_col]).add_(eps), 1.0 - beta2t)
        r_factor = (row / row.mean(dim=dim_col, keepdim=True)).rsqrt_().unsqueeze(dim_row)
        c_factor = col.unsqueeze(dim_col).rsqrt()

        def update(start, end):  # timm's (r * c) * grad, for rows start:end
            return torch.mul(_rows(r_factor, start, end), _rows(c_factor, start, end)).mul_(grad[start:end])
        # pass 2: the update's RMS, for timm's clipping of the whole tensor
        sum_sq = sum(float(update(start, end).square_().sum()) for start, end in _slices(grad))  # added as doubles
        denom = max(1.0, math.sqrt(sum_sq / grad.numel()) / clip)
        # pass 3: weight decay and the update, slice by slice
        for start, end in _slices(grad):
            w = p[start:end]
            if wd != 0:
                w.add_(w, alpha=-wd * lr)
            w.sub_(update(start, end).div_(denom).mul_(lr))


def register_optimizers() -> None:
    """Register ``adafactorlean`` with timm's optimizer factory (``create_optimizer_v2``, train.py ``--opt``)."""
    from timm.optim import OptimInfo, list_optimizers
    from timm.optim._optim_factory import default_registry  # the factory's registry: timm exports no register()
    if 'adafactorlean' not in list_optimizers():
        default_registry.register(OptimInfo(
            name='adafactorlean', opt_class=AdafactorLean, has_betas=True,
            description="timm's Adafactor computed without parameter-sized temporaries (jetmoe_timm)"))
