""" Activation statistics of a predecessor, collected with forward hooks in one pass over calibration data.

Per probe (a module output, or a module input) and per feature (last dim) it accumulates in float64 the count of
positions, the sums of |x| and x^2 and the count of x > 0, from which ``STATISTICS`` are read, and, where asked,
co-activation counts (x > 0)^T (x > 0) for the graph method.
"""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._modes import eval_mode

__all__ = ['STATISTICS', 'Probe', 'ActivationStats', 'WeightStatistics', 'mlp_weight_importance',
           'collect_statistics']

# each statistic from a probe's running sums (_Accumulator), per feature
_STATISTIC_OF_SUMS = {
    'l2': lambda a: (a.sum_sq / a.count).sqrt(),  # root mean square (the official default)
    'l1': lambda a: a.sum_abs / a.count,  # mean absolute value
    'freq': lambda a: a.pos / a.count,  # fraction of positions with a positive value
}
STATISTICS = tuple(_STATISTIC_OF_SUMS)
_ROWS = 1024  # activation rows (positions) reduced at a time


@dataclass(frozen=True)
class Probe:
    """Where to measure: ``module``'s output (or its input, for ``on_input``), optionally with co-activation."""
    module: str
    on_input: bool = False
    coact: bool = False


class _Accumulator:
    def __init__(self, coact: bool):
        self.count = 0
        self.sum_abs = self.sum_sq = self.pos = None
        self.coact_sum = None
        self.want_coact = coact

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.sum_abs is None:
            d = x.shape[-1]
            self.sum_abs, self.sum_sq, self.pos = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
            if self.want_coact:
                self.coact_sum = torch.zeros(d, d, dtype=torch.float64)
        self.count += x.shape[0]
        # in row chunks: float64 copies of a whole batch's activations (32 x 197 x 1536 for ViT-S) would cost
        # ~80 MB each, several per probe, the largest transient of a conversion
        # the sums on the CPU, where selection reads them, whatever device the predecessor runs on
        for chunk in x.split(_ROWS):
            xd = chunk.double()  # exact from any float dtype
            pos = xd > 0
            self.sum_abs += xd.abs().sum(0).cpu()
            self.sum_sq += (xd * xd).sum(0).cpu()
            self.pos += pos.sum(0, dtype=torch.float64).cpu()
            if self.want_coact:
                b = pos.float()
                self.coact_sum += (b.t() @ b).double().cpu()  # exact: float32 holds integers up to 2^24


class ActivationStats:
    """Finished statistics: ``stats[module, 'l2']`` -> (D,) float64; ``stats.coact(module)`` -> (D, D)."""

    def __init__(self, accumulators: Dict[str, _Accumulator], num_images: int, source: str):
        self._acc = accumulators
        self.num_images = num_images
        self.source = source

    def __getitem__(self, key) -> torch.Tensor:
        module, statistic = key
        if statistic not in _STATISTIC_OF_SUMS:
            raise ValueError(f"Unknown statistic '{statistic}'; choose one of {', '.join(STATISTICS)}.")
        return _STATISTIC_OF_SUMS[statistic](self._acc[module])

    def coact(self, module: str) -> torch.Tensor:
        c = self._acc[module].coact_sum
        if c is None:
            raise KeyError(f'no co-activation was collected for {module}')
        return c


class WeightStatistics:
    """Data-free statistics read off the predecessor's weights (``calib='weights'``), in float64: each family's
    subclass answers ``stats[module, statistic]`` for its probes from the weights alone (any statistic gives the same
    score). No co-activation."""
    num_images = 0
    source = 'weights'

    def __init__(self, pred: nn.Module):
        self.pred = pred

    def coact(self, module: str) -> torch.Tensor:
        raise ValueError("co-activation needs activation statistics: pass calibration images, not calib='weights'.")


@torch.no_grad()
def mlp_weight_importance(mlp: nn.Module) -> torch.Tensor:
    """|fc1 row| * |fc2 column| per hidden neuron of a dense MLP: (hidden,) float64."""
    return mlp.fc1.weight.double().norm(dim=1) * mlp.fc2.weight.double().norm(dim=0)


@torch.no_grad()
def collect_statistics(
        model: nn.Module,
        probes: List[Probe],
        batches: Iterable[torch.Tensor],
        source: str = '',
        bar: Optional[tqdm] = None,
) -> ActivationStats:
    """Run ``batches`` (B, C, H, W) through ``model`` in eval mode and gather statistics at ``probes``; ``bar``, a
    caller's progress bar, advances one step per batch."""
    modules = dict(model.named_modules())
    missing = [p.module for p in probes if p.module not in modules]
    if missing:
        raise ValueError(f'the predecessor has no module(s) {missing}: is it the right model family?')
    acc = {p.module: _Accumulator(p.coact) for p in probes}
    handles = []
    for p in probes:
        a = acc[p.module]
        if p.on_input:
            handles.append(modules[p.module].register_forward_pre_hook(lambda m, args, a=a: a.update(args[0])))
        else:
            handles.append(modules[p.module].register_forward_hook(lambda m, args, out, a=a: a.update(out)))
    first = next(model.parameters())  # images go to the model's device and dtype (a bf16 predecessor)
    num_images = 0
    try:
        with eval_mode(model):
            for x in batches:
                model(x.to(first.device, first.dtype))
                num_images += x.shape[0]
                if bar is not None:
                    bar.update()
    finally:
        for h in handles:
            h.remove()
    if num_images == 0:
        raise ValueError('the calibration data yielded no images')
    return ActivationStats(acc, num_images, source)
