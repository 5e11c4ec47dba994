#!/usr/bin/env python
"""Time and peak memory of converting a full-size JetMoE model from its full-size dense predecessor.

The predecessor (v_jetmoe_tiny: a ViT-S/16; c_jetmoe_femto: a ConvNeXt-T) is randomly initialised (timing does
not depend on the values), written to a local safetensors file and fed through the same path as a real
checkpoint. Each method runs in a fresh process so that its peak resident memory is its own.

    python scripts/bench_convert.py [--model v_jetmoe_tiny] [--methods importance graph] [--num-calib 256]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# the dense architecture of each model's recycled tag (random weights stand in for the checkpoint)
PREDECESSORS = {'v_jetmoe_tiny': ('vit_small_patch16_224', 21843), 'c_jetmoe_femto': ('convnext_tiny', 21841)}

CHILD = r'''
import json, resource, sys, time
import jetmoe_timm
t0 = time.perf_counter()
jetmoe_timm.convert(sys.argv[5], sys.argv[2], predecessor=sys.argv[1], method=sys.argv[3],
                    num_calib=int(sys.argv[4]), progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)))
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='v_jetmoe_tiny', choices=sorted(PREDECESSORS))
    parser.add_argument('--methods', nargs='+', default=['importance', 'graph'])
    parser.add_argument('--num-calib', type=int, default=256)
    args = parser.parse_args()
    import timm
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        arch, num_classes = PREDECESSORS[args.model]
        pred = timm.create_model(arch, num_classes=num_classes)
        pred_file = os.path.join(tmp, f'{arch}.safetensors')
        save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, pred_file)
        del pred
        rows = []
        for method in args.methods:
            out = os.path.join(tmp, f'out_{method}')
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, '-c', CHILD, pred_file, out, method, str(args.num_calib), args.model],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(model=args.model, method=method, process_seconds=time.perf_counter() - t0)
            rows.append(r)
            print(f"{args.model} {method:12s} convert {r['seconds']:7.1f} s  (process {r['process_seconds']:6.1f} s)  "
                  f"peak RSS {r['peak_rss_gb']:5.2f} GB", flush=True)
    print(json.dumps(rows))


if __name__ == '__main__':
    main()
