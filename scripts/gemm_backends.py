""" GMAC/s of the matmuls behind the speed ratios: the dense twin's GEMM and the experts' batched matmuls, through
the BLAS that ATen picks (MKL for float32, oneDNN for bfloat16) and through oneDNN directly.

ATen sends float32 `mm` / `bmm` / `addmm` to MKL; oneDNN's float32 kernels are reachable only one 2-D matmul at a
time (`torch.ops.mkldnn._linear_pointwise`, what inductor uses), so the experts through oneDNN are a loop of E
calls, Python overhead included. Operands are made once; candidates take turns every round; medians.

    python scripts/gemm_backends.py [--batch-sizes 32 64 128] [--rounds 9]
"""
import argparse
import statistics

import torch

from jetmoe_timm.tools.bench import interleaved_times

TOKENS, DIM, CORE, UNIV = 197, 192, (98, 768), (196, 192)  # v_jetmoe_tiny: one MoE block


def _onednn_linear(x, w_t):
    """x (rows, in) @ w_t (out, in)^T through oneDNN (float32 brgemm)."""
    return torch.ops.mkldnn._linear_pointwise(x, w_t, None, 'none', [], '')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    parser.add_argument('--rounds', type=int, default=9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; GMAC/s (median ms)')
    for batch in args.batch_sizes:
        rows = {'dense fc1': ((1, batch * TOKENS, DIM), DIM * 4)}
        rows.update({f'core fc1 ({CORE[0]} experts)': ((CORE[0], batch, DIM), CORE[1]),
                     f'univ fc1 ({UNIV[0]} experts)': ((UNIV[0], batch, DIM), UNIV[1])})
        for name, ((E, T, d), h) in rows.items():
            macs = E * T * d * h / 1e6
            x = torch.randn(E, T, d)
            w = torch.randn(E, d, h) * .02
            w_t = w.transpose(1, 2).contiguous()  # oneDNN takes (out, in) weights
            xb, wb = x.bfloat16(), w.bfloat16()
            cands = {
                'float32 ATen (MKL)': lambda: torch.bmm(x, w),
                'float32 oneDNN': lambda: [_onednn_linear(x[e], w_t[e]) for e in range(E)],
                'bf16 ATen (oneDNN)': lambda: torch.bmm(xb, wb),
            }
            torch.testing.assert_close(torch.stack(cands['float32 oneDNN']()), cands['float32 ATen (MKL)'](),
                                       rtol=1e-4, atol=1e-4)
            times = interleaved_times(cands, args.rounds, warmup=1)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = '  '.join(f'{k} {macs / v:6.1f} ({v:6.2f})' for k, v in ms.items())
            print(f'batch {batch:4d}  {name:22s} {cells}', flush=True)


if __name__ == '__main__':
    main()
