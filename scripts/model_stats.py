#!/usr/bin/env python
"""Parameters, GMACs and CPU inference throughput of JetMoE models next to their dense twins.

    python scripts/model_stats.py [--batch-size 32] [--rounds 5]
"""
import argparse
import datetime
import json

import timm
import torch

import jetmoe_timm  # noqa: F401  (registers the models)
from jetmoe_timm.profile import count_macs, count_params, throughput_side_by_side

PAIRS = [('v_jetmoe_tiny', 'vit_tiny_patch16_224')]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--json', default=None, help='also write the figures here')
    args = parser.parse_args()
    rows = []
    for moe_name, dense_name in PAIRS:
        models = {n: timm.create_model(n, num_classes=1000) for n in (moe_name, dense_name)}
        ips = throughput_side_by_side(models, batch_size=args.batch_size, rounds=args.rounds)
        for n, m in models.items():
            rows.append(dict(model=n, params_m=count_params(m) / 1e6, gmacs=count_macs(m) / 1e9, img_s=ips[n]))
        rows.append(dict(model=f'{moe_name} / {dense_name}', img_s_ratio=ips[moe_name] / ips[dense_name]))
    print(f'# {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}  '
          f'batch {args.batch_size}, fp32 inference, median of {args.rounds} interleaved rounds')
    print(f"{'model':40s} {'params (M)':>11s} {'GMACs':>7s} {'img/s':>8s}")
    for r in rows:
        if 'img_s_ratio' in r:
            print(f"{r['model']:40s} {'':>11s} {'':>7s} {r['img_s_ratio']:>7.2f}x")
        else:
            print(f"{r['model']:40s} {r['params_m']:11.2f} {r['gmacs']:7.3f} {r['img_s']:8.1f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
