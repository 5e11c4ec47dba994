#!/usr/bin/env python
"""Parameters and GMACs per 224x224 image of every JetMoE variant next to its dense twin (the README's table).

Models are built on the meta device (no memory, no weights), so the big variants count as fast as the small ones.
Speed side by side is the benchmark's job: ``jetmoe-timm bench``.

    python scripts/model_stats.py [--json stats.json]
"""
import argparse
import json

import timm

import jetmoe_timm  # noqa: F401  (registers the models)
from jetmoe_timm.profile import count_macs, count_params
from jetmoe_timm.tools.bench import PAIRS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', default=None, help='also write the figures here')
    args = parser.parse_args(argv)
    rows = []
    for pair in PAIRS:
        for name, kwargs in ((pair.model, pair.model_kwargs), (pair.twin, pair.twin_kwargs)):
            m = timm.create_model(name, num_classes=1000, device='meta', **kwargs)
            rows.append(dict(model=name, kwargs=kwargs, params_m=count_params(m) / 1e6,
                             gmacs=count_macs(m, pair.input_size) / 1e9))
    print(f"{'model':60s} {'params (M)':>11s} {'GMACs':>7s}")
    for r in rows:
        label = r['model'] + (f" {r['kwargs']}" if r['kwargs'] else '')
        print(f"{label:60s} {r['params_m']:11.2f} {r['gmacs']:7.3f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
