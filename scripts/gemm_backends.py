""" GMAC/s of the matmuls behind the speed ratios: the dense twin's GEMM and the experts' batched matmuls, through
the BLAS that ATen picks (MKL for float32, oneDNN for bfloat16) and through oneDNN directly.

ATen sends float32 `mm` / `bmm` / `addmm` to MKL; oneDNN's float32 kernels are reachable only one 2-D matmul at a
time (`torch.ops.mkldnn._linear_pointwise`, what inductor uses), so the experts through oneDNN are a loop of E
calls, Python overhead included. `--brgemm` adds a grouped kernel written for this measurement: one C++ call that
runs oneDNN's batch-reduce GEMM micro-kernel (`at::native::cpublas::brgemm`, the one inductor's and sglang's CPU
kernels call) over every (expert, row block, column block) tile in parallel, in float32 and in bf16 (weights in
VNNI layout, float32 output), built with `torch.utils.cpp_extension` (needs a C++ compiler, ~20 s). It runs the
dense GEMM too, so each kernel's expert rate can be read against its own dense rate. `--in-cache` adds the core
experts' shape with 8 experts (4.7 MB of float32 weights, inside L3) next to the 98 of v_jetmoe_tiny (58 MB).
Operands are made once; candidates take turns every round; medians.

    python scripts/gemm_backends.py [--batch-sizes 32 64 128] [--rounds 9] [--brgemm] [--in-cache]
"""
import argparse
import statistics
from typing import Optional

import torch

from jetmoe_timm.tools.bench import interleaved_times

TOKENS, DIM, CORE, UNIV = 197, 192, (98, 768), (196, 192)  # v_jetmoe_tiny: one MoE block

_BRGEMM_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>

// x (E, M, K); w (E, K, N) float32, or bfloat16 in VNNI layout (E, K/2, N, 2); returns (E, M, N) float32.
torch::Tensor grouped_brgemm(torch::Tensor x, torch::Tensor w, int64_t block_m, int64_t block_n) {
  const int64_t E = x.size(0), M = x.size(1), K = x.size(2);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t N = w.size(2);  // w is (E, K/2, N, 2) or (E, K, N)
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && w.scalar_type() == x.scalar_type(), "contiguous, same dtype");
  TORCH_CHECK(w.size(0) == E && w.numel() == E * K * N && (!bf16 || K % 2 == 0), "w does not match x");
  const int64_t mb = (M + block_m - 1) / block_m, nb = (N + block_n - 1) / block_n;
  auto out = torch::empty({E, M, N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, E * mb * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / (mb * nb), m0 = (t / nb) % mb * block_m, n0 = t % nb * block_n;
      const int64_t m = std::min(block_m, M - m0), n = std::min(block_n, N - n0);
      float* c = o + (e * M + m0) * N + n0;
      if (bf16) {
        const auto* a = x.data_ptr<at::BFloat16>() + (e * M + m0) * K;
        const auto* b = w.data_ptr<at::BFloat16>() + e * K * N + n0 * 2;  // a VNNI column is a pair
        at::native::cpublas::brgemm(m, n, K, K, N, N, false, a, b, c, true);
      } else {
        const float* a = x.data_ptr<float>() + (e * M + m0) * K;
        const float* b = w.data_ptr<float>() + e * K * N + n0;
        at::native::cpublas::brgemm(m, n, K, K, N, N, false, a, b, c, false);
      }
    }
    if (bf16) at::native::cpublas::brgemm_release(true);
  });
  return out;
}
"""


def _onednn_linear(x, w_t):
    """x (rows, in) @ w_t (out, in)^T through oneDNN (float32 brgemm)."""
    return torch.ops.mkldnn._linear_pointwise(x, w_t, None, 'none', [], '')


def _build_brgemm():
    from torch.utils.cpp_extension import load_inline
    # Without OpenMP, at::parallel_for runs on the calling thread alone.
    return load_inline('jetmoe_grouped_brgemm', cpp_sources=_BRGEMM_SOURCE, functions=['grouped_brgemm'],
                       extra_cflags=['-O3', '-fopenmp'], extra_ldflags=['-fopenmp'])


def _brgemm_bf16_problem(brgemm) -> Optional[str]:
    """Why the bf16 micro-kernel does not run here (oneDNN generates none on CPUs without avx512_bf16 or AMX), or
    None."""
    try:
        brgemm.grouped_brgemm(torch.zeros(1, 2, 2, dtype=torch.bfloat16), torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16),
                              2, 2)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return None


def _vnni(w: torch.Tensor) -> torch.Tensor:
    """(E, K, N) bfloat16 -> (E, K/2, N, 2): the pairs of rows that one VNNI dot product takes."""
    E, K, N = w.shape
    return w.view(E, K // 2, 2, N).transpose(2, 3).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--brgemm', action='store_true', help='add the grouped oneDNN brgemm kernel (C++ build)')
    parser.add_argument('--in-cache', action='store_true', help='add the core shape with 8 experts (in L3)')
    args = parser.parse_args(argv)
    brgemm = _build_brgemm() if args.brgemm else None
    bf16_problem = _brgemm_bf16_problem(brgemm) if brgemm is not None else None
    brgemm_bf16 = brgemm is not None and bf16_problem is None
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; GMAC/s (median ms)')
    if bf16_problem:
        print(f'no bf16 brgemm ({bf16_problem}): oneDNN makes bf16 micro-kernels on CPUs with avx512_bf16 or AMX')
    for batch in args.batch_sizes:
        rows = {'dense fc1': ((1, batch * TOKENS, DIM), DIM * 4)}
        rows.update({f'core fc1 ({CORE[0]} experts)': ((CORE[0], batch, DIM), CORE[1]),
                     f'univ fc1 ({UNIV[0]} experts)': ((UNIV[0], batch, DIM), UNIV[1])})
        if args.in_cache:
            rows['core fc1 (8 experts)'] = ((8, batch, DIM), CORE[1])
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
            if brgemm is not None:
                wb_vnni = _vnni(wb)
                # Row blocks of 64 for the dense GEMM; an expert's rows (the batch) are one block.
                block_m = 64 if E == 1 else T
                cands['float32 brgemm'] = lambda: brgemm.grouped_brgemm(x, w, block_m, 192)
                torch.testing.assert_close(cands['float32 brgemm'](), torch.bmm(x, w), rtol=1e-4, atol=1e-4)
                if brgemm_bf16:
                    cands['bf16 brgemm'] = lambda: brgemm.grouped_brgemm(xb, wb_vnni, block_m, 192)
                    torch.testing.assert_close(cands['bf16 brgemm'](), torch.bmm(xb.float(), wb.float()),
                                               rtol=1e-3, atol=1e-3)
            times = interleaved_times(cands, args.rounds, warmup=1)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = '  '.join(f'{k} {macs / v:6.1f} ({v:6.2f})' for k, v in ms.items())
            print(f'batch {batch:4d}  {name:22s} {cells}', flush=True)


if __name__ == '__main__':
    main()
