""" v_jetmoe_tiny inference with and without the no-grad memory reuse of the SpheroMoE layers, against ViT-T.

One process, candidates interleaved (the order alternates every round), median seconds per batch; ratio = images/s
of the candidate / images/s of vit_tiny_patch16_224. Candidates: the shipped defaults (kept no-grad buffers: routing
tensors, and in float32 the experts' activations); in float32 with the routing buffers only
(``SpheroMoE._experts_in_buffers`` off, the code before 2026-12-06 10:00); without any (``SpheroMoE._claims_no_grad_buffers``
off); under bf16 autocast also with the opt-in kept autocast weight copies (``set_autocast_weight_cache(model)``),
with and without the buffers, and with autocast casting the expert weights itself (before 2026-12-06 the experts did
not cast them per call). ``--no-grad``: calls under ``torch.no_grad`` instead of ``torch.inference_mode``. Outputs of
all candidates are checked equal.

    python scripts/inference_ab.py [--batch-sizes 32 64 128] [--precisions float32 bf16] [--rounds 7] [--no-grad]
"""
import argparse
import contextlib
import copy
import functools
import statistics
from unittest import mock

import timm
import torch

import jetmoe_timm
from jetmoe_timm.layers import ExpertLinear, SpheroMoE
from jetmoe_timm.tools.bench import interleaved_times


def _switch(cls, predicate: str, enabled: bool):
    """``cls.predicate`` as it is, or answering False: a no-grad feature of the layer switched off."""
    return contextlib.nullcontext() if enabled else mock.patch.object(cls, predicate, lambda self, x: False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[32, 64, 128])
    parser.add_argument('--precisions', nargs='+', choices=['float32', 'bf16'], default=['float32', 'bf16'])
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--no-grad', action='store_true',
                        help='run under torch.no_grad instead of torch.inference_mode')
    args = parser.parse_args(argv)
    grad_mode = torch.no_grad if args.no_grad else torch.inference_mode
    torch.manual_seed(0)
    moe = timm.create_model('v_jetmoe_tiny', num_classes=1000).eval()
    copies = copy.deepcopy(moe)
    jetmoe_timm.set_autocast_weight_cache(copies)
    dense = timm.create_model('vit_tiny_patch16_224', num_classes=1000).eval()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per batch, ratio vs the dense twin')
    for precision in args.precisions:
        # (model, buffers: 'all' / 'routing' / 'none', experts' own casts on); the weight copies only matter under
        # autocast, the experts' buffers only without it
        cands = {'default': (moe, 'all', True), 'no buffers': (moe, 'none', True),
                 'dense twin': (dense, 'all', True)}
        if precision == 'float32':
            cands['routing buffers only'] = (moe, 'routing', True)
        if precision == 'bf16':
            cands.update({'weight copies': (copies, 'all', True),
                          'weight copies, no buffers': (copies, 'none', True),
                          "autocast's own casts": (moe, 'all', False)})
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, 224, 224)

            def run(model, buffers, own_casts):
                with _switch(SpheroMoE, '_claims_no_grad_buffers', buffers != 'none'), \
                        _switch(SpheroMoE, '_experts_in_buffers', buffers == 'all'), \
                        _switch(ExpertLinear, '_casts_for_autocast', own_casts), grad_mode(), \
                        torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
                    return model(x)
            outs = [run(*c) for name, c in cands.items() if name != 'dense twin']
            assert all(torch.equal(o, outs[0]) for o in outs), 'candidates disagree'
            # the equality check above was the JetMoE candidates' first call
            times = interleaved_times({k: functools.partial(run, *c) for k, c in cands.items()}, args.rounds, warmup=0)
            med = {k: statistics.median(v) for k, v in times.items()}
            cells = '  '.join(f'{k} {med[k] * 1e3:7.1f} ms ({med["dense twin"] / med[k]:.2f})' for k in cands)
            print(f'{precision:8s} batch {batch:4d}  {cells}', flush=True)


if __name__ == '__main__':
    main()
