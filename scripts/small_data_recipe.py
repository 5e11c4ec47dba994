""" Measure the small-data recipe through timm's own train.py: recycled V-JetMoE vs the same MoE from scratch.

Uses the demo's layer-scale predecessor (pretrained on Fashion-MNIST by `jetmoe-timm demo`, read from its cache),
converts it with `jetmoe-timm convert` (task images for calibration, statistics at the successor's size), exports
1,000 / 1,000 MNIST-5k images as an ImageFolder tree and fine-tunes through `jetmoe-timm-train`:

    recycled + recipes/v_jetmoe_small_data_finetune.yaml
    scratch  + the same recipe
    recycled + the previous small-data recipe (layer decay 0.6, RandAugment, crops from half the image)
    recycled + this recipe with the memory-lean optimizer (adafactorlean, LEAN_OPTIMIZER)

for each seed, then prints top-1 per epoch (train.py's summary.csv) and the final mean / spread.

    JETMOE_TIMM_SCRIPTS=/path/to/pytorch-image-models python scripts/small_data_recipe.py --out /tmp/recipe
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from timm.models import save_for_hf

import jetmoe_timm  # noqa: F401  (registers the models)
from jetmoe_timm.tools.demo import CONFIGS, PRED_ARGS, SUCC_ARGS, pretrained_predecessor, predecessor_cache_path
from jetmoe_timm.recycle.build import cache_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / 'recipes' / 'v_jetmoe_small_data_finetune.yaml'
# the recipe this one replaces, as command-line overrides of it
PREVIOUS = ['--layer-decay', '0.6', '--aa', 'rand-m6-mstd0.5-inc1', '--hflip', '0', '--scale', '0.5', '1.0',
            '--warmup-epochs', '2', '--clip-grad', '1.0', '--drop-path', '0.05']


# the memory-lean optimizer (docs/training.md, section 7): timm's Adafactor update (no first moment, factored second
# moments, the recipe's lr as given) without parameter-sized temporaries
LEAN_OPTIMIZER = ['--opt', 'adafactorlean']


def _kwargs(args: dict, skip=('num_classes',)):
    """``k=v`` model kwargs (train.py takes ``num_classes`` and ``in_chans`` as options of their own)."""
    return [f'{k}={list(v) if isinstance(v, tuple) else v}' for k, v in args.items() if k not in skip]


def _run(cmd, log: Path):
    with open(log, 'w') as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f'failed ({proc.returncode}): {" ".join(map(str, cmd))}\nsee {log}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--seeds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--runs', nargs='+', default=['recycled', 'scratch', 'previous', 'lean'],
                   choices=['recycled', 'scratch', 'previous', 'lean'],
                   help="which runs: 'recycled' / 'scratch' (this recipe), 'previous' (recycled, previous recipe), "
                        "'lean' (recycled, this recipe with the memory-lean optimizer)")
    p.add_argument('--experts', type=int, nargs=2, metavar=('CORE', 'UNIV'),
                   help='core and universal experts per MoE layer (default: the demo\'s 8 and 16). Over 16 in a '
                        'path, timm\'s Adafactor factors expert weights across experts, as for the registered models '
                        '(98 and 196), where with 16 or fewer it factors each expert on its own.')
    p.add_argument('--predecessor-config', default='full', choices=sorted(CONFIGS),
                   help="the demo configuration whose cached predecessor is recycled (default 'full': `jetmoe-timm "
                        "demo`; 'quick': `jetmoe-timm demo --quick`)")
    args = p.parse_args(argv)
    succ_args = dict(SUCC_ARGS)
    if args.experts:
        succ_args.update(num_core_experts=args.experts[0], num_univ_experts=args.experts[1])
    if not os.environ.get('JETMOE_TIMM_SCRIPTS'):
        sys.exit('set JETMOE_TIMM_SCRIPTS to a timm checkout holding train.py')
    args.out.mkdir(parents=True, exist_ok=True)

    data = args.out / 'mnist1k'
    if not data.exists():
        _run([sys.executable, '-m', 'jetmoe_timm.tools.cli', 'data', 'export', 'mnist5k', str(data), '--limit', '1000'],
             args.out / 'export.log')
    pred_dir = args.out / 'predecessor'
    if not pred_dir.exists():
        key_cfg = CONFIGS[args.predecessor_config]
        tag = f"vit{PRED_ARGS['embed_dim']}_ls"
        if not predecessor_cache_path(PRED_ARGS, key_cfg, tag).is_file():
            quick = ' --quick' if args.predecessor_config == 'quick' else ''
            sys.exit(f'no cached {args.predecessor_config} demo predecessor in {cache_dir() / "demo"}: run '
                     f'`jetmoe-timm demo{quick}` first')
        pred = pretrained_predecessor(PRED_ARGS, key_cfg, None, tag)  # from the cache
        save_for_hf(pred, pred_dir, safe_serialization=True)
    succ_dir = args.out / 'recycled'
    if not succ_dir.exists():
        _run([sys.executable, '-m', 'jetmoe_timm.tools.cli', 'convert', 'v_jetmoe_tiny', '--out', str(succ_dir),
              '--predecessor', f'local-dir:{pred_dir}', '--calib', str(data / 'train'), '--num-calib', '1000',
              '--no-progress', '--model-kwargs', *_kwargs(succ_args)], args.out / 'convert.log')
    retention = json.loads((succ_dir / 'config.json').read_text())['jetmoe']['retention']
    print(f"recycled init: linear CKA {retention['cka']:.3f} with the predecessor (random init "
          f"{retention['cka_scratch']:.3f})")

    common = [str(data), '--config', str(RECIPE), '--model-kwargs', *_kwargs(succ_args, ('num_classes', 'in_chans')),
              '--img-size', '32',
              '--in-chans', '1', '--device', 'cpu', '-j', '0', '--epochs', str(args.epochs), '--output',
              str(args.out / 'runs'), '--log-interval', '100']
    recycled = ['--pretrained', '--pretrained-path', str(succ_dir / 'model.safetensors')]
    runs = {  # id: (label, extra train.py options)
        'recycled': ('recycled, this recipe', recycled),
        'scratch': ('scratch, this recipe', []),
        'previous': ('recycled, previous recipe', recycled + PREVIOUS),
        'lean': ('recycled, lean optimizer', recycled + LEAN_OPTIMIZER),
    }
    runs = dict(runs[k] for k in args.runs)
    results = {}
    for name, extra in runs.items():
        results[name] = []
        for seed in range(args.seeds):
            exp = f"{name.replace(', ', '_').replace(' ', '-')}_s{seed}"
            run_dir = args.out / 'runs' / exp
            if not (run_dir / 'summary.csv').exists() or len(list(csv.DictReader(open(run_dir / 'summary.csv')))) < args.epochs:
                _run([sys.executable, '-m', 'jetmoe_timm.train', *common, '--experiment', exp, '--seed', str(seed),
                      *extra], args.out / f'{exp}.log')
            with open(run_dir / 'summary.csv') as f:
                top1 = [float(r['eval_top1']) for r in csv.DictReader(f)]
            results[name].append(top1)
            print(f'{name:28s} seed {seed}: ' + ' '.join(f'{a:5.1f}' for a in top1))
    print(f"\n{'run':28s} " + ' '.join(f'{f"ep{e + 1}":>5s}' for e in range(args.epochs)) + '   final (± std, range)')
    for name, curves in results.items():
        mean = [statistics.fmean(c[e] for c in curves) for e in range(args.epochs)]
        finals = [c[-1] for c in curves]
        spread = f' ± {statistics.stdev(finals):.1f} ({min(finals):.1f}-{max(finals):.1f})' if len(finals) > 1 else ''
        print(f'{name:28s} ' + ' '.join(f'{a:5.1f}' for a in mean) + f'   {mean[-1]:.1f}{spread}')
    (args.out / 'results.json').write_text(json.dumps(dict(retention=retention, results=results), indent=2))


if __name__ == '__main__':
    main()
