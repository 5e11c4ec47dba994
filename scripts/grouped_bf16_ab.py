""" What a grouped bf16 expert kernel would buy v_jetmoe_tiny's bf16 autocast inference, against ViT-T.

Not shipped (docs/benchmark.md, "What limits", item 0): this measures the one lever that compares like with like
in bf16. ``kernel, packed once``: the experts' no-grad bf16 autocast matmuls run through the grouped oneDNN brgemm
kernel of ``scripts/gemm_backends.py`` (a C++ build, ~20 s) instead of ATen's ``baddbmm``, on weights cast to bf16
in VNNI layout on their first call and kept, like the opt-in ``set_autocast_weight_cache``, whose model runs beside
it (``opt-in copies``), with the shipped defaults and the dense twin. One process, candidates interleaved, median
seconds per batch; ratio = images/s against vit_tiny_patch16_224 under bf16 autocast. Outputs are checked close to the default path's (bf16 rounding
differs: the kernel accumulates in float32 and rounds once).

    python scripts/grouped_bf16_ab.py [--batch-sizes 32 64] [--rounds 7]
"""
import argparse
import contextlib
import copy
import functools
import importlib.util
import statistics
from pathlib import Path
from typing import Dict, Optional
from unittest import mock

import timm
import torch

from jetmoe_timm import set_autocast_weight_cache
from jetmoe_timm.layers import ExpertLinear
from jetmoe_timm.tools.bench import interleaved_times

_spec = importlib.util.spec_from_file_location('gemm_backends', Path(__file__).with_name('gemm_backends.py'))
gemm_backends = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemm_backends)


@contextlib.contextmanager
def _grouped_kernel(kernel, packed: Optional[Dict[int, torch.Tensor]]):
    """ExpertLinear's no-grad bf16 autocast calls through the grouped kernel; with ``packed``, a dict kept by the
    caller, each layer's weights are packed on its first call only."""
    plain = ExpertLinear.forward

    def forward(self, x):
        if torch.is_grad_enabled() or not torch.is_autocast_enabled('cpu'):
            return plain(self, x)
        w = packed.get(id(self)) if packed is not None else None
        if w is None:
            w = gemm_backends._vnni(self.weight.detach().bfloat16())
            if packed is not None:
                packed[id(self)] = w
        T = x.shape[1]
        out = kernel.grouped_brgemm(x.to(torch.bfloat16).contiguous(), w, T, 192)
        return out.add_(self.bias.unsqueeze(1)).to(torch.bfloat16)

    with mock.patch.object(ExpertLinear, 'forward', forward):
        yield


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64])
    parser.add_argument('--rounds', type=int, default=7)
    args = parser.parse_args(argv)
    kernel = gemm_backends._build_brgemm()
    torch.manual_seed(0)
    moe = timm.create_model('v_jetmoe_tiny').eval()
    twin = timm.create_model('vit_tiny_patch16_224').eval()
    moe_copies = copy.deepcopy(moe)
    set_autocast_weight_cache(moe_copies)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 autocast inference, median ms per batch '
          f'(ratio = images/s / those of vit_tiny_patch16_224)')
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 224, 224)

        def run(model, grouped, packed=None):
            ctx = _grouped_kernel(kernel, packed) if grouped else contextlib.nullcontext()
            with ctx, torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
                return model(x)

        cands = {'twin': (twin, False), 'default (ATen baddbmm)': (moe, False),
                 'opt-in copies (ATen baddbmm)': (moe_copies, False), 'kernel, packed once': (moe, True, {})}
        ref = run(moe, False).float()
        for name in ('opt-in copies (ATen baddbmm)', 'kernel, packed once'):
            torch.testing.assert_close(run(*cands[name]).float(), ref, rtol=0.05, atol=0.05)
        times = interleaved_times({k: functools.partial(run, *c) for k, c in cands.items()}, args.rounds, warmup=1)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = '  '.join(f'{k} {v:7.1f}' + ('' if k == 'twin' else f' ({ms["twin"] / v:.2f})') for k, v in ms.items())
        print(f'batch {batch:4d}  {cells}', flush=True)


if __name__ == '__main__':
    main()
