""" The convergence demo: does checkpoint recycling make MoE models learn faster and better? On real data, offline.

1. Pretrain a small dense ViT predecessor with layer scale (as DeiT-3 and DINOv2 have) on all of Fashion-MNIST
   (cached after the first run), plus a narrow one of the successor's width for the official recipe's body.
2. Recycle it into a V-JetMoE successor (half width, MoE in the later half, core = N/2 and universal = N experts,
   no layer scale: the predecessor's is folded into the weights) with every selection method, the official
   recipe and the built-in synthetic calibration, and into a dense successor of the same width (equal FLOPs).
3. Fine-tune each on 1,000 MNIST-5k images (small data: where a predecessor's knowledge should matter) and test
   on the 1,000 held-out ones, next to the same MoE and dense models from scratch. Every run uses the same
   plain recipe (AdamW 5e-4, weight decay 0.05, one warm-up epoch, cosine, label smoothing 0.1, 2 px shifts):
   no layer decay, which freezes a recycled body that has to adapt. The MoE rows that decide the verdict
   (scratch, importance, dense recycled) run 3 seeds.
4. Print test accuracy per epoch, epochs-to-target versus MoE scratch, final accuracy with its spread, and what
   survived at init (linear CKA with the predecessor's features, a ridge probe); then the retention of every
   method with statistics taken at the successor's input size or at the predecessor's (run at 64 px).
   Writes JSON, Markdown and a PNG.

    jetmoe-timm demo [--quick] [--out DIR]

Measured on 2 CPU cores (2026-12-05): the full run 641 s (3 seeds; recycled MoE 79.6 %, MoE from scratch 45.3 %);
--quick 415 s with other load on the machine (one seed, 6 epochs; 65.2 % against 32.1 %).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from ..atomic import write_atomic
from ..export import save_safetensors_atomic
from ..profile import count_params
from ..recycle import CALIB_SIZES, METHODS, recycle
from ..recycle.build import cache_dir
from ..recycle.retention import linear_cka, pooled_features
from .checks import check_output_folder

__all__ = ['run_demo', 'markdown_table', 'add_parser']

IMG = 32  # 28x28 images padded to 32 so that patch 8 gives a 4x4 grid

# architecture: predecessor d=192 / 6 heads with layer scale, successor d'=96 / 3 heads (head_dim 32 kept), depth 6,
# MoE in blocks 3..5 with N/2 = 8 core and N = 16 universal experts (N = 16 patch tokens). Patch 8 rather than 4:
# a quarter of the tokens makes every step 4x cheaper, which buys the predecessor three epochs of all 60k
# Fashion-MNIST images inside the time budget.
PRED_ARCH = 'vit_tiny_patch16_224'  # the timm architecture PRED_ARGS build on
PRED_ARGS = dict(img_size=IMG, patch_size=8, in_chans=1, embed_dim=192, depth=6, num_heads=6, num_classes=10,
                 global_pool='avg', init_values=1e-5)
BODY_ARGS = dict(PRED_ARGS, embed_dim=96, num_heads=3)
SUCC_ARGS = dict(img_size=IMG, patch_size=8, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10,
                 moe_blocks=(3, 4, 5), num_core_experts=8, num_univ_experts=16)
NATIVE_IMG = 64  # the retention table runs the predecessor at 64 px: a predecessor of higher native resolution

CONFIGS = {
    # pretrain_images None: all 60,000 Fashion-MNIST training images
    'full': dict(pretrain_images=None, pretrain_epochs=3, epochs=10, batch_size=64, calib_images=1024, lr=5e-4,
                 train_limit=1000, seeds=3, compare_calibration=True),
    'quick': dict(pretrain_images=20000, pretrain_epochs=1, epochs=6, batch_size=64, calib_images=256, lr=5e-4,
                  train_limit=1000, seeds=1),
    # the same pipeline on toy sizes, for the test suite
    'smoke': dict(pretrain_images=64, pretrain_epochs=1, epochs=1, batch_size=64, calib_images=16, lr=5e-4,
                  train_limit=64, test_limit=50, width=0.25, seeds=2, compare_calibration=True),
}
SEEDED_RUNS = ('moe scratch', 'dense recycled', 'moe importance')  # the rows the verdict rests on


def scaled_args(args: Dict, width: float) -> Dict:
    """Architecture args with widths scaled (heads kept) and fewer experts, for the smoke configuration."""
    if width == 1:
        return args
    out = dict(args, embed_dim=int(args['embed_dim'] * width), depth=4)
    if 'moe_blocks' in args:
        out.update(moe_blocks=(2, 3), num_core_experts=4, num_univ_experts=8)
    return out


def load_demo_split(name: str, split: str, limit: Optional[int] = None):
    """Images padded to 32 px and normalised as the models are trained, and labels; ``limit`` takes the same
    number of each class (first in source order: MNIST-5k is sorted by class, so a plain prefix would not do)."""
    from .data import balanced_subset, load_arrays
    images, labels = load_arrays(name, split)
    if limit:
        keep = balanced_subset(labels, limit)
        images, labels = images[keep], labels[keep]
    x = torch.tensor(images).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.tensor(labels).long()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 px (pad and crop), the only augmentation: cheap and label-safe."""
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    return pad[..., i:i + x.shape[-2], j:j + x.shape[-1]]  # images of any size (scripts train at 56 px too)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def train(model, x, y, x_test, y_test, epochs, batch_size, lr, seed=0, desc='') -> List[float]:
    """AdamW + warm-up + cosine, label smoothing; returns test accuracy after each epoch (index 0: before)."""
    g = torch.Generator().manual_seed(seed)
    # fused AdamW: several times faster than the foreach kernels on CPU for MoE-sized parameter counts
    opt = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.05, fused=True)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=steps // epochs, warmup_lr_init=lr * 0.01,
                              lr_min=lr * 0.01, t_in_epochs=False)
    accs = [evaluate(model, x_test, y_test)]
    step = 0
    bar = tqdm(total=steps, desc=desc, unit='step', leave=False, disable=None)  # a terminal only, as recycling's
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            bar.update()
        accs.append(evaluate(model, x_test, y_test))
        bar.set_postfix(acc=f'{accs[-1]:.1f}')
    bar.close()
    return accs


def predecessor_cache_path(args: Dict, cfg: Dict, tag: str, seed: int = 0, arch: str = PRED_ARCH) -> Path:
    """Where the demo keeps its pretrained predecessor of this architecture, configuration (and training seed)."""
    # seed 0 and the demo's ViT: the keys of earlier versions, whose cached predecessors stay valid
    key = ([args, cfg['pretrain_images'], cfg['pretrain_epochs']] + ([seed] if seed else [])
           + ([arch] if arch != PRED_ARCH else []))
    key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_dir() / 'demo' / f'{tag}_{key}.safetensors'


def pretrained_predecessor(args: Dict, cfg: Dict, data, tag: str, seed: int = 0, arch: str = PRED_ARCH) -> nn.Module:
    """A dense timm model (the demo's ViT unless ``arch`` names another) built with ``args`` and trained on
    Fashion-MNIST (init, order and augmentation from ``seed``), cached by its configuration."""
    path = predecessor_cache_path(args, cfg, tag, seed, arch)
    torch.manual_seed(seed)
    model = timm.create_model(arch, **args)
    if path.is_file():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(path))
        print(f'predecessor {tag}: cached ({path})')
        return model.eval()
    x, y, xt, yt = data
    t0 = time.perf_counter()
    accs = train(model, x, y, xt, yt, cfg['pretrain_epochs'], 64, 1e-3, seed, desc=f'pretrain {tag}')
    print(f'predecessor {tag}: Fashion-MNIST test accuracy {accs[-1]:.1f}% ({time.perf_counter() - t0:.0f} s)')
    save_safetensors_atomic(model.state_dict(), path, dict(demo_predecessor=tag, fashion_mnist_acc=accs[-1]))
    return model.eval()


def _epochs_to(accs: List[float], target: float) -> Optional[int]:
    return next((e for e, a in enumerate(accs) if a >= target), None)


@torch.no_grad()
def linear_probe(model: nn.Module, x, y, xt, yt) -> float:
    """Accuracy of a ridge-regression probe on the pooled features: what the features know, head aside."""
    model.eval()
    f, ft = pooled_features(model, [x], chunk=250), pooled_features(model, [xt], chunk=250)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    f, ft = (f - mu) / sd, (ft - mu) / sd
    f1 = torch.cat([f, torch.ones(len(f), 1)], 1).double()
    w = torch.linalg.solve(f1.t() @ f1 + 1e-1 * torch.eye(f1.shape[1], dtype=torch.float64),
                           f1.t() @ F.one_hot(y, 10).double())
    pred = (torch.cat([ft, torch.ones(len(ft), 1)], 1).double() @ w).argmax(-1)
    return 100.0 * (pred == yt).float().mean().item()


def _cka(pred: nn.Module, model: nn.Module, calib: torch.Tensor) -> float:
    """Linear CKA of the model's pooled features with the predecessor's on the calibration images."""
    batches = calib.split(128)
    return linear_cka(pooled_features(pred, batches), pooled_features(model, batches))


def _retention_table(pred, calib, data, succ_args, cfg, seed) -> List[Dict]:
    """What survives at init, per method, with statistics at the successor's 32 px or at the predecessor's 64 px.

    The predecessor runs at 64 px (position embedding resampled to an 8x8 grid), standing in for a predecessor of
    higher native resolution than its successor (DINOv2: 518 px, a successor at 56 px)."""
    native = copy.deepcopy(pred)
    native.set_input_size(img_size=NATIVE_IMG)
    x, y, xt, yt = data
    rows = []
    for calib_size in CALIB_SIZES:
        for method in METHODS:
            torch.manual_seed(seed + 1)
            model = timm.create_model('v_jetmoe_tiny', **succ_args)
            r = recycle(model, native, method=method, calib=torch.utils.data.TensorDataset(calib),
                        num_calib=cfg['calib_images'],
                        calib_size=calib_size, seed=seed, progress=False)
            model.load_state_dict(r.state_dict)
            rows.append(dict(calib_size=calib_size, method=method, cka=r.provenance['retention']['cka'],
                             cka_scratch=r.provenance['retention']['cka_scratch'],
                             probe=linear_probe(model, x, y, xt, yt)))
    return rows


def run_demo(out: os.PathLike = 'jetmoe_demo', quick: bool = False, seed: int = 0, config: Optional[str] = None) -> Dict:
    """Run the demo ('full', or 'quick'; 'smoke' is a toy size for tests) and write its JSON and plot to ``out``."""
    name = config or ('quick' if quick else 'full')
    cfg = CONFIGS[name]
    width = cfg.get('width', 1)
    pred_args, body_args, succ_args = (scaled_args(a, width) for a in (PRED_ARGS, BODY_ARGS, SUCC_ARGS))
    out = Path(out)  # made when there are results to write: a run that stops early leaves no empty folder
    t_start = time.perf_counter()
    fm = (*load_demo_split('fashion-mnist', 'train', cfg['pretrain_images']),
          *load_demo_split('fashion-mnist', 'validation', 2000))
    x, y = load_demo_split('mnist5k', 'train', cfg.get('train_limit'))
    xt, yt = load_demo_split('mnist5k', 'validation', cfg.get('test_limit'))
    print(f'data: Fashion-MNIST {len(fm[0])} pretraining images; MNIST-5k {len(x)} train / {len(xt)} test')

    pred = pretrained_predecessor(pred_args, cfg, fm, f"vit{pred_args['embed_dim']}_ls")
    body = pretrained_predecessor(body_args, cfg, fm, f"vit{body_args['embed_dim']}_ls")
    calib = fm[0][:cfg['calib_images']]  # the predecessor's own domain
    seeds = [seed + i for i in range(cfg['seeds'])]

    def successor(s, **kw):
        torch.manual_seed(s + 1)
        return timm.create_model('v_jetmoe_tiny', **dict(succ_args, **kw))

    def recycled(s, method='importance', recipe='paper', calib_src=None, **kw):
        model = successor(s, **kw)
        r = recycle(model, pred, method=method, recipe=recipe, calib=calib_src or torch.utils.data.TensorDataset(calib),
                    num_calib=cfg['calib_images'], body_predecessor=body if recipe == 'official' else None,
                    seed=s, progress=False)
        model.load_state_dict(r.state_dict)
        model.reset_classifier(10)  # Fashion-MNIST classes mean nothing for digits: a fresh head for everyone
        return model, r

    # each maker takes a seed and returns (model, RecycleResult or None for scratch)
    runs = {
        'moe scratch': lambda s: (successor(s), None),
        'dense scratch': lambda s: (successor(s, moe_blocks=()), None),
        'dense recycled': lambda s: recycled(s, moe_blocks=()),
    }
    for method in METHODS:
        runs[f'moe {method}'] = lambda s, m=method: recycled(s, m)
    runs['moe importance, official recipe'] = lambda s: recycled(s, recipe='official')
    if cfg.get('compare_calibration'):
        runs['moe importance, synthetic calib'] = lambda s: recycled(s, calib_src='synthetic')

    results, selections = {}, {}
    for run, make in runs.items():
        results[run] = []
        for s in (seeds if run in SEEDED_RUNS else seeds[:1]):
            t0 = time.perf_counter()
            model, recycle_result = make(s)
            if recycle_result is not None and s == seed:
                selections[run] = recycle_result.selection
            cka0, probe0 = _cka(pred, model, calib[:256]), linear_probe(model, x, y, xt, yt)
            accs = train(model, x, y, xt, yt, cfg['epochs'], cfg['batch_size'], cfg['lr'], s, desc=f'{run} s{s}')
            results[run].append(dict(seed=s, acc=accs, cka_before=cka0, probe_before=probe0,
                                     probe_after=linear_probe(model, x, y, xt, yt),
                                     seconds=time.perf_counter() - t0,
                                     params_m=count_params(model) / 1e6))
            print(f'{run:34s} seed {s}  final {accs[-1]:5.1f}%  at init: CKA {cka0:.3f}, probe {probe0:5.1f}%  '
                  f'({results[run][-1]["seconds"]:.0f} s)')

    # how the synthetic calibration compares with in-domain images: overlap of the selected channels / neurons
    calib_cmp = {}
    if cfg.get('compare_calibration'):
        ch_in = set(selections['moe importance']['channels'].tolist())
        ch_syn = set(selections['moe importance, synthetic calib']['channels'].tolist())
        calib_cmp = dict(channel_jaccard=len(ch_in & ch_syn) / len(ch_in | ch_syn))
    retention_rows = _retention_table(pred, calib, (x, y, xt, yt), succ_args, cfg, seed)

    table = _summary_rows(results, cfg['epochs'])
    summary = dict(config=dict(cfg, name=name), seed=seed, seeds=seeds, succ_args=succ_args, pred_args=pred_args,
                   results=results, table=table, retention=retention_rows, calibration_comparison=calib_cmp,
                   wall_seconds=time.perf_counter() - t_start, torch=torch.__version__, timm=timm.__version__)
    _print_tables(summary)
    # each file whole or not at all: an interrupted write after 11 minutes leaves the last run's, not half of one
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / 'demo_results.json', lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str)))
    write_atomic(out / 'demo_results.md', lambda tmp: tmp.write_text(markdown_table(summary)))
    _plot(summary, out / 'demo_convergence.png')
    print(f'wrote {out / "demo_results.json"} and {out / "demo_convergence.png"} ({summary["wall_seconds"]:.0f} s)')
    return summary


def _summary_rows(results: Dict[str, List[Dict]], epochs: int) -> List[Dict]:
    """One row per run: accuracy per epoch averaged over its seeds, final mean / std / range, the epoch at which
    the mean curve reaches MoE scratch's mean final accuracy, and what survived at init."""
    def mean(values):
        return statistics.fmean(values)

    target = mean([r['acc'][-1] for r in results['moe scratch']])
    table = []
    for run, seeds in results.items():
        curve = [mean([r['acc'][e] for r in seeds]) for e in range(epochs + 1)]
        finals = [r['acc'][-1] for r in seeds]
        e = _epochs_to(curve, target)
        table.append(dict(run=run, seeds=len(seeds), acc=curve, final=curve[-1],
                          final_std=statistics.stdev(finals) if len(finals) > 1 else None,
                          final_min=min(finals), final_max=max(finals), epochs_to_scratch_final=e,
                          speedup=(epochs / e) if e else None, delta_vs_moe_scratch=curve[-1] - target,
                          cka_before=mean([r['cka_before'] for r in seeds]),
                          probe_before=mean([r['probe_before'] for r in seeds])))
    return table


def _final_cell(row: Dict) -> str:
    if row['final_std'] is None:
        return f"{row['final']:.1f}"
    return f"{row['final']:.1f} ± {row['final_std']:.1f} ({row['final_min']:.1f}-{row['final_max']:.1f})"


def _row_cells(row: Dict):
    """(epochs to target, speed-up) of one table row, '-' where the target was not reached."""
    e = row['epochs_to_scratch_final']
    return '-' if e is None else str(e), f"{row['speedup']:.1f}x" if row['speedup'] else '-'


def _print_tables(summary: Dict) -> None:
    epochs = summary['config']['epochs']
    print("\nMNIST test accuracy (%) per epoch, mean over seeds; target = MoE scratch's final accuracy")
    print(f"{'run':34s} {'seeds':>5s} " + ' '.join(f"{f'ep{e}':>5s}" for e in range(epochs + 1))
          + f"  {'final (± std, range)':>24s}  to-target  speed-up  Δfinal  CKA@init  probe@init")
    for row in summary['table']:
        to_target, speedup = _row_cells(row)
        print(f"{row['run']:34s} {row['seeds']:5d} " + ' '.join(f'{a:5.1f}' for a in row['acc'])
              + f"  {_final_cell(row):>24s}  {to_target:>9}  {speedup:>8}  {row['delta_vs_moe_scratch']:+6.1f}"
              + f"  {row['cka_before']:8.3f}  {row['probe_before']:10.1f}")
    print(f"\nRetention at init (predecessor at {NATIVE_IMG} px, successor at {IMG} px): linear CKA with the "
          f"predecessor's features / ridge probe on MNIST")
    for r in summary['retention']:
        print(f"  statistics at the {r['calib_size']:11s} size  {r['method']:10s}  CKA {r['cka']:.3f} "
              f"(random init {r['cka_scratch']:.3f})  probe {r['probe']:5.1f}%")


def markdown_table(summary: Dict) -> str:
    """The results tables in Markdown (written next to the JSON as demo_results.md)."""
    epochs = summary['config']['epochs']
    lines = ['| run | seeds | ' + ' | '.join(f'ep {e}' for e in range(epochs + 1))
             + ' | final (± std, range) | epochs to MoE-scratch final | speed-up | final vs MoE scratch'
             + ' | CKA at init | probe at init |',
             '|---|' + '---:|' * (epochs + 8)]
    for row in summary['table']:
        to_target, speedup = _row_cells(row)
        lines.append(f"| {row['run']} | {row['seeds']} | " + ' | '.join(f'{a:.1f}' for a in row['acc'])
                     + f" | {_final_cell(row)} | {to_target} | {speedup} | {row['delta_vs_moe_scratch']:+.1f}"
                     + f" | {row['cka_before']:.3f} | {row['probe_before']:.1f} |")
    lines += ['', '| statistics taken at | method | CKA at init | CKA of random init | probe at init |',
              '|---|---|---:|---:|---:|']
    size = {'successor': f'successor size ({IMG} px)', 'predecessor': f'predecessor size ({NATIVE_IMG} px)'}
    for r in summary['retention']:
        lines.append(f"| {size[r['calib_size']]} | {r['method']} | {r['cka']:.3f} | {r['cka_scratch']:.3f} "
                     f"| {r['probe']:.1f} |")
    return '\n'.join(lines) + '\n'


def _plot(summary: Dict, path: Path) -> None:
    from matplotlib.figure import Figure  # a bare Figure: pyplot's backend and state stay the caller's
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for row in summary['table']:
        style = '--' if 'scratch' in row['run'] else '-'
        label = row['run'] + (f" ({row['seeds']} seeds)" if row['seeds'] > 1 else '')
        ax.plot(range(len(row['acc'])), row['acc'], style, marker='o', ms=3, label=label,
                lw=2.5 if row['seeds'] > 1 else 1.2)
    ax.set_xlabel('epoch')
    ax.set_ylabel('MNIST test accuracy (%), 1,000 training images')
    ax.set_title('Recycled V-JetMoE vs scratch (predecessor: layer-scale ViT pretrained on Fashion-MNIST)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png'))


def _run(args) -> int:
    check_output_folder(args.out, overwrite=True)  # before 11 minutes of training, not at the first write after
    run_demo(args.out, args.quick, args.seed)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('demo', help='convergence demo: recycled MoE vs scratch on real data, offline',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true',
                   help='a smaller run: one seed, 20k-image pretraining for 1 epoch, 6 fine-tune epochs; 415 s on 2 '
                        'CPU cores with other load (the full run: 641 s); recycled MoE about 65 %% against 32 %% '
                        'from scratch')
    p.add_argument('--out', default='jetmoe_demo', help='folder for demo_results.json, demo_results.md and '
                                                         'demo_convergence.png (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='first seed of the recycling and fine-tunes: rows with '
                                                       'several seeds take seed, seed + 1, ...; the predecessors are '
                                                       'pretrained (and cached) with seed 0 (default: %(default)s)')
    p.set_defaults(func=_run)
