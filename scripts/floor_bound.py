""" The most any SpheroMoE implementation on these matmul kernels could give v_jetmoe_tiny against its dense twin.

Issue 20 asks for v_jetmoe_tiny inference at 0.90x its dense twin (the FLOP ceiling is 0.92x) and a training step
at 0.85x. This times, side by side in one process, eager inference (and with ``--modes train`` a fused-AdamW
training step, as `jetmoe-timm bench` times it), float32 or bf16 autocast, of:
- the dense twin, vit_tiny_patch16_224;
- v_jetmoe_tiny as shipped;
- v_jetmoe_tiny with every SpheroMoE layer replaced by its matmul floor (the layer's matmuls alone, as the benchmark
  times them: same shapes, contiguous operands into preallocated outputs, no softmax, noise, GELU, bias or copy),
  each layer with operands of its own, so that the model reads as many weight bytes per forward as the real one;
  in training its backward runs the floor's backward matmuls and hands the layer's parameters gradients kept from
  step to step (no fresh gradient memory), so the optimizer steps every parameter, as in the real model.
The floor model's ratio bounds what any layer implementation that runs these matmuls through ATen's kernels could
reach: if it stays under a target, no change of the layer's own code meets that target on this machine. A bound up to
cache effects: the floor's operands are tensors of their own (its backward reads a transposed copy of each weight),
where a real layer feeds each matmul the last one's output, a few MB per matmul that may still be in cache.
Ratios are paired: the twin's time over the candidate's within each round, median over the rounds (`jetmoe-timm
bench` divides the medians instead; on a quiet machine the two agree, under other load the paired one varies less).

    python scripts/floor_bound.py [--batch-sizes 32 64 128] [--modes infer train] [--rounds 9]
        [--device cuda] [--precision bf16]

``--precision bf16`` runs the models under bf16 autocast against a floor of bfloat16 matmuls (as the benchmark's
``--layer-precisions bf16``); ``--device`` runs all three on a GPU (each timed call ends with a synchronisation).
"""
import argparse
import copy
import platform
import statistics

import timm
import torch
import torch.nn as nn

import jetmoe_timm  # noqa: F401  (registers v_jetmoe_tiny)
from jetmoe_timm.layers import SpheroMoE
from jetmoe_timm.tools.bench import PRECISIONS, MatmulFloor, timed_runner, interleaved_times


class _FloorFn(torch.autograd.Function):
    """The floor's forward matmuls; in backward its backward matmuls, and kept gradients for the layer's parameters
    (autograd never sees them: the real layer's parameter gradients come from these matmuls)."""

    @staticmethod
    def forward(ctx, x, floor, params, grads):
        ctx.floor, ctx.params, ctx.grads = floor, params, grads
        floor.forward()
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.floor.backward()
        for p, g in zip(ctx.params, ctx.grads):
            p.grad = g
        return grad, None, None, None


class FloorLayer(nn.Module):
    """Stands in for one SpheroMoE layer (kept as ``layer``, whose parameters the optimizer steps): runs its matmul
    floor for the batch it sees and returns a copy of the input (B, N, d) (the real layer writes an output of that
    size too)."""

    def __init__(self, layer: SpheroMoE, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layer = layer
        self.dtype = dtype  # of the floor's matmuls
        self.floors = {}  # (batch, tokens) -> MatmulFloor, built on first use: its operands are the weights' bytes
        self.grads = None  # kept gradients of the layer's parameters, made on the first backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.shape[1])
        if key not in self.floors:
            self.floors.clear()  # one batch size at a time: 6 layers' operands are ~1 GB
            with torch.inference_mode(False):  # normal tensors: the training mode writes them too
                self.floors[key] = MatmulFloor(self.layer, *key, dtype=self.dtype, device=x.device)
        if not torch.is_grad_enabled():
            self.floors[key].forward()
            return x.clone()
        params = [p for p in self.layer.parameters() if p.requires_grad]
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in params]
        return _FloorFn.apply(x, self.floors[key], params, self.grads)


def floor_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``model`` whose SpheroMoE layers are ``FloorLayer``s with matmuls in ``dtype``."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SpheroMoE):
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, FloorLayer(module, dtype))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    p.add_argument('--modes', nargs='+', choices=['infer', 'train'], default=['infer'])
    p.add_argument('--rounds', type=int, default=9)
    p.add_argument('--precision', choices=['float32', 'bf16'], default='float32')
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error('--rounds must be at least 2 (the ratios report quartiles)')
    device = torch.device(args.device)
    torch.manual_seed(0)
    moe = timm.create_model('v_jetmoe_tiny', num_classes=1000, device=device).eval()
    floor_dtype = PRECISIONS[args.precision] or torch.float32
    models = {'dense twin': timm.create_model('vit_tiny_patch16_224', num_classes=1000, device=device).eval(),
              'v_jetmoe_tiny': moe, 'v_jetmoe_tiny, MoE layers at their floor': floor_model(moe, floor_dtype)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.05, fused=True) for k, m in models.items()}
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}'
    print(f'torch {torch.__version__}, {where}; {args.precision}, median ms per batch (range) over {args.rounds} '
          f'interleaved rounds; ratio: images/s against the dense twin, median of the rounds\' ratios')
    for batch in args.batch_sizes:
        x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 1000, (batch,), device=device)
        for mode in args.modes:
            for m in models.values():
                m.train(mode == 'train')
            cands = {k: timed_runner(m, mode, x, y, args.precision, opts[k]) for k, m in models.items()}  # the bench's
            times = interleaved_times(cands, args.rounds, warmup=2, device=device)
            for name, t in times.items():
                # paired: the twin's time over the candidate's in the same round, where both met the same load
                ratios = sorted(d / c for d, c in zip(times['dense twin'], t))
                quartiles = statistics.quantiles(ratios, n=4)
                print(f'{mode:5s} batch {batch:4d}  {name:42s} {statistics.median(t) * 1e3:8.1f} ms '
                      f'({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})  ratio {statistics.median(ratios):.2f} '
                      f'(quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f})', flush=True)
        for m in models.values():  # free the floor operands of this batch size
            for layer in m.modules():
                if isinstance(layer, FloorLayer):
                    layer.floors.clear()


if __name__ == '__main__':
    main()
