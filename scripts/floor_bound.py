""" The most any SpheroMoE implementation on these matmul kernels could give v_jetmoe_tiny against its dense twin.

Issue 20 asks for v_jetmoe_tiny inference at 0.90x its dense twin (the FLOP ceiling is 0.92x). This times, side by
side in one process, float32 eager inference of:
- the dense twin, vit_tiny_patch16_224;
- v_jetmoe_tiny as shipped;
- v_jetmoe_tiny with every SpheroMoE layer replaced by its matmul floor (the layer's matmuls alone, as the benchmark
  times them: same shapes, contiguous operands into preallocated outputs, no softmax, noise, GELU, bias or copy),
  each layer with operands of its own, so that the model reads as many weight bytes per forward as the real one.
The floor model's ratio bounds what any layer implementation that runs these matmuls through ATen's kernels could
reach: if it stays under a target, no change of the layer's own code meets that target on this CPU.

    python scripts/floor_bound.py [--batch-sizes 32 64 128] [--rounds 9]
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
from jetmoe_timm.tools.bench import _MatmulFloor, interleaved_times


class FloorLayer(nn.Module):
    """Stands in for one SpheroMoE layer: runs its matmul floor for the batch it sees; returns the input (B, N, d)
    unchanged (no grad: inference only)."""

    def __init__(self, layer: SpheroMoE):
        super().__init__()
        self.layer = layer
        self.floors = {}  # (batch, tokens) -> _MatmulFloor, built on first use: its operands are the weights' bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], x.shape[1])
        if key not in self.floors:
            self.floors.clear()  # one batch size at a time: 6 layers' operands are ~1 GB
            self.floors[key] = _MatmulFloor(self.layer, *key)
        self.floors[key].forward()
        return x


def floor_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SpheroMoE layers are ``FloorLayer``s."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SpheroMoE):
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, FloorLayer(module))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    p.add_argument('--rounds', type=int, default=9)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    moe = timm.create_model('v_jetmoe_tiny', num_classes=1000).eval()
    models = {'dense twin': timm.create_model('vit_tiny_patch16_224', num_classes=1000).eval(),
              'v_jetmoe_tiny': moe, 'v_jetmoe_tiny, MoE layers at their floor': floor_model(moe).eval()}
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()};'
          f' float32 inference, median ms per batch (range) over {args.rounds} interleaved rounds')
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 224, 224)

        def runner(m):
            def run():
                with torch.inference_mode():
                    m(x)
            return run
        times = interleaved_times({k: runner(m) for k, m in models.items()}, args.rounds, warmup=2)
        base = statistics.median(times['dense twin'])
        for name, t in times.items():
            med = statistics.median(t)
            print(f'batch {batch:4d}  {name:42s} {med * 1e3:8.1f} ms ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})  '
                  f'ratio {base / med:.2f}')
        for m in models.values():  # free the floor operands of this batch size
            for layer in m.modules():
                if isinstance(layer, FloorLayer):
                    layer.floors.clear()


if __name__ == '__main__':
    main()
