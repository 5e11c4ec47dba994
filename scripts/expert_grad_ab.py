""" The SpheroMoE layer's forward+backward with the experts' kept gradient memory (``set_keep_grad_memory``, opt-in)
against the default (a fresh weight gradient every step).

One process, candidates alternating over 8 rounds (2 steps each), v_jetmoe_tiny's layer shape, float32; each step
starts with ``zero_grad(set_to_none=True)`` as timm's train.py does.

    python scripts/expert_grad_ab.py [BATCH]
"""
import argparse
import statistics
import time

import torch

from jetmoe_timm.layers import SpheroMoE, set_keep_grad_memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    parser.add_argument('batch', type=int, nargs='?', default=64, help='images per step (default: 64)')
    batch = parser.parse_args(argv).batch
    torch.manual_seed(0)
    layer = SpheroMoE(192, 98, 196).train()
    x = torch.randn(batch, 197, 192, requires_grad=True)
    grad = torch.randn(batch, 197, 192)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    times = {'default': [], 'kept gradient memory': []}
    for r in range(8):
        for name in reversed(list(times)) if r % 2 else times:
            set_keep_grad_memory(layer, name == 'kept gradient memory')  # switched off, the kept memory is freed
            step()
            t0 = time.perf_counter()
            step()
            step()
            times[name].append((time.perf_counter() - t0) / 2)
    for name, t in times.items():
        print(f'{name:22s} median {statistics.median(t) * 1e3:6.1f} ms  min {min(t) * 1e3:6.1f} ms')


if __name__ == '__main__':
    main()
