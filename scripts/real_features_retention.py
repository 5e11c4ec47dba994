""" What survives recycling when the predecessor carries what real checkpoints carry, measured on trained weights.

Random weights prove the index maps exact (tests/test_recycle_exact.py); whether knowledge survives needs trained
ones. This trains small dense predecessors on Fashion-MNIST with the demo's recipe (`jetmoe-timm demo`; the ViTs
d=192, depth 6, layer scale), one per flavour of real checkpoint:

- 'layer scale'  the demo's predecessor: 32 px, patch 8 (4x4 grid), class token with a position embedding;
- 'registers'    + 4 register tokens and prefix tokens without position embedding (DINOv2-reg, DeiT-3's class);
- 'patch 7'      56 px, patch 7 (8x8 grid): a smaller patch and a larger grid than the successor's, as DINOv2's
                 patch 14 at 518 px (37x37) is for a successor at 224 px / patch 16 (14x14);
- 'all'          registers and patch 7 together;
- 'convnext'     a ConvNeXt (timm's blocks: depthwise 7x7, LayerNorm, MLP, layer scale, as convnext_tiny.fb_in22k)
                 at 32 px with a stride-2 stem, depths 2-2-4-2, dims 64-512;

recycles each (importance sampling, 256 Fashion-MNIST calibration images) into a successor at half width and
measures, before any fine-tuning, on images no step has seen: for the ViTs the demo's V-JetMoE (32 px, patch 8,
d'=96, MoE in blocks 3..5), for the ConvNeXt a C-JetMoE as c_jetmoe_femto is to convnext_tiny (dims halved, MoE in
the later half of the blocks, N/2 core and N universal experts for the N positions of a stage):
- linear CKA of the successor's pooled features with the predecessor's, each at its own input size (the
  predecessor at its native size: what a user's checkpoint knows; and resampled to the successor's grid, what
  the successor could at most keep), next to the successor's random init;
- ridge probes on the pooled features: Fashion-MNIST (the predecessor's own task) and MNIST-5k (transfer);
- the same for the predecessor itself, native and resampled to the successor's grid by timm (`set_input_size`):
  what the resampling alone keeps, before any channel or neuron is dropped.
Successor rows run --seeds seeds (the recycling seed and the init of what is not recycled) for each of
--predecessor-seeds predecessors per flavour: median and range.

    python scripts/real_features_retention.py --out DIR [--seeds 3] [--flavours ...] [--methods ...]
        [--predecessor-seeds 1] [--calib images|weights] [--dense-successor] [--successor-kwargs K=V ...]
        [--predecessor-kwargs K=V ...]
        [--pretrain-images 60000]

Without --flavours, the four ViT flavours run; 'convnext' is asked for by name. --predecessor-kwargs changes the
predecessors (e.g. a ConvNeXt pretrained at a successor's width, as the control for its fine-tune).

`--smoke` runs the same pipeline on toy sizes (quarter width, few images) for the test suite.

Predecessors are cached like the demo's (in $JETMOE_TIMM_CACHE/demo), so a second run only measures.
"""
import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from jetmoe_timm.atomic import write_atomic
from jetmoe_timm.recycle import METHODS, recycle
from jetmoe_timm.recycle.engine import check_options
from jetmoe_timm.recycle.retention import linear_cka, pooled_features
from jetmoe_timm.tools.checks import check_model_kwargs, parse_model_kwargs
from jetmoe_timm.tools.demo import IMG, PRED_ARCH, PRED_ARGS, SUCC_ARGS, evaluate, linear_probe, load_demo_split, \
    pretrained_predecessor, scaled_args, train

# The ConvNeXt pair: a stride-2 stem gives 16, 8, 4 and 2 px grids at 32 px, so that stage 3 routes 16 positions, as
# the ViTs' MoE blocks route 16 patch tokens; the successor has the predecessor's depths at half its dims, MoE in the
# later half of the blocks (stage 3's last three, stage 4), N/2 core and N universal experts for N positions (the
# counts of stages 1 and 2, which hold no MoE block, are not used)
CNX_PRED_ARGS = dict(in_chans=1, num_classes=10, depths=(2, 2, 4, 2), dims=(64, 128, 256, 512), patch_size=2)
CNX_SUCC_ARGS = dict(CNX_PRED_ARGS, dims=(32, 64, 128, 256), num_core_experts=(1, 1, 8, 2),
                     num_univ_experts=(1, 1, 16, 4))
FAMILIES = {  # family -> (predecessor architecture, its args, successor architecture, its args)
    'vit': (PRED_ARCH, PRED_ARGS, 'v_jetmoe_tiny', SUCC_ARGS),
    'convnext': ('convnext_tiny', CNX_PRED_ARGS, 'c_jetmoe_femto', CNX_SUCC_ARGS),
}
FLAVOURS = {  # name -> (family, predecessor args over the family's)
    'layer scale': ('vit', {}),
    'registers': ('vit', dict(reg_tokens=4, no_embed_class=True)),
    'patch 7': ('vit', dict(img_size=56, patch_size=7)),
    'all': ('vit', dict(img_size=56, patch_size=7, reg_tokens=4, no_embed_class=True)),
    'convnext': ('convnext', {}),
}
# images per use: recycling's calibration, each probe's train and test split, the held-out CKA set; model width
SIZES = {'full': dict(calib=256, probe=1000, held_out=1000, width=1),
         'smoke': dict(calib=16, probe=50, held_out=32, width=0.25)}


def _family_args(family: str, width: float, dense: bool):
    """(predecessor arch, args, successor arch, args) of ``family`` at ``width`` (the smoke configuration's 0.25
    also makes the models shallower); ``dense``: a successor without MoE blocks."""
    pred_arch, pred_args, succ_arch, succ_args = FAMILIES[family]
    if family == 'vit':
        pred_args, succ_args = scaled_args(pred_args, width), scaled_args(succ_args, width)
    elif width != 1:
        pred_args, succ_args = ({**a, 'dims': tuple(int(c * width) for c in a['dims']), 'depths': (1, 1, 2, 1)}
                                for a in (pred_args, succ_args))
    return pred_arch, pred_args, succ_arch, dict(succ_args, moe_blocks=()) if dense else succ_args


def _at(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, 1, 32, 32) at ``size`` px: the same content for a predecessor of another native size."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)


def _measure(model, size, refs, held_out, fm_probe, mnist_probe, feats=None):
    """CKA with the predecessor's features on ``held_out`` (``refs``: {'cka': native, 'cka_resampled': resampled to
    the successor's grid, where it differs}), and the two probes, for a model fed ``size`` px; ``feats``: the
    model's features on ``held_out`` where they are at hand (the predecessor's are the references)."""
    feats = pooled_features(model, [_at(held_out, size)]) if feats is None else feats
    (fx, fy, fxt, fyt), (mx, my, mxt, myt) = fm_probe, mnist_probe
    return dict(**{k: linear_cka(ref, feats) for k, ref in refs.items()},
                probe_fm=linear_probe(model, _at(fx, size), fy, _at(fxt, size), fyt),
                probe_mnist=linear_probe(model, _at(mx, size), my, _at(mxt, size), myt))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', type=Path, required=True, help='folder for real_features_retention.json')
    p.add_argument('--seeds', type=int, default=3, help='successor seeds per predecessor')
    p.add_argument('--predecessor-seeds', type=int, default=1,
                   help='predecessors trained per flavour (init, order and augmentation from seeds 0, 1, ...)')
    p.add_argument('--flavours', nargs='+', choices=list(FLAVOURS),
                   default=[f for f, (family, _) in FLAVOURS.items() if family == 'vit'],
                   help='default: the ViT flavours')
    p.add_argument('--pretrain-images', type=int, default=60000, help='Fashion-MNIST images each predecessor sees')
    p.add_argument('--pretrain-epochs', type=int, default=1)
    p.add_argument('--calib', default='images', choices=['images', 'weights'],
                   help="what the neurons are ranked by: activations on Fashion-MNIST images (default) or the "
                        "weights alone (recycling's data-free calib='weights')")
    p.add_argument('--methods', nargs='+', default=['importance'], choices=list(METHODS),
                   help="how each expert's neurons are sampled; several: a recycled row per method, side by side")
    p.add_argument('--dense-successor', action='store_true',
                   help='a successor without MoE blocks (the same width and recycled body): what the width alone keeps')
    p.add_argument('--successor-kwargs', nargs='*', default=[], metavar='K=V',
                   help="successor arguments over the family's (e.g. num_heads=6: all the ViT predecessor's heads at "
                        "half their width)")
    p.add_argument('--predecessor-kwargs', nargs='*', default=[], metavar='K=V',
                   help="predecessor arguments over the flavour's (e.g. dims=(48,96,192,384): a ConvNeXt pretrained "
                        "at three quarters of the width)")
    p.add_argument('--finetune-epochs', type=int, default=0,
                   help="then fine-tune every successor this many epochs on the MNIST-5k probe's train split with a "
                        "fresh head, as the demo does (AdamW, batch 64), and report its test accuracy; the "
                        "predecessor too, once per seed, as the control")
    p.add_argument('--finetune-lr', type=float, default=5e-4, help="the fine-tune's peak learning rate (the demo's)")
    p.add_argument('--finetune-images', type=int, default=None,
                   help="fine-tune on this many of the probe's training images, a fixed random subset "
                        "(default: all 1,000)")
    p.add_argument('--finetune-head-epochs', type=int, default=0,
                   help='before --finetune-epochs, train the fresh head alone this many epochs (linear probing, then '
                        'all weights)')
    p.add_argument('--finetune-head-lr', type=float, default=None,
                   help="the head-alone epochs' peak learning rate (default: --finetune-lr)")
    p.add_argument('--smoke', action='store_true', help='toy sizes, for the test suite')
    args = p.parse_args(argv)
    n = SIZES['smoke' if args.smoke else 'full']
    if args.pretrain_images < 1:
        p.error(f'--pretrain-images must be at least 1, got {args.pretrain_images}')
    for method in args.methods:  # e.g. graph with --calib weights: refused now, not after the predecessors' training
        try:
            check_options(method=method, calib='weights' if args.calib == 'weights' else 'synthetic')
        except ValueError as e:
            p.error(f'--methods {method}: {e}')
    if args.finetune_images is not None:
        if not args.finetune_epochs:
            p.error('--finetune-images chooses the images of a fine-tune: give --finetune-epochs too')
        if not 1 <= args.finetune_images <= n['probe']:
            p.error(f"--finetune-images must be between 1 and the probe's {n['probe']} training images, "
                    f"got {args.finetune_images}")
    models = {}  # flavour -> (family, predecessor arch, its args, successor arch, its args)
    for flavour in args.flavours:
        family, extra = FLAVOURS[flavour]
        pred_arch, base_pred, succ_arch, succ_args = _family_args(family, n['width'], args.dense_successor)
        try:  # malformed or misspelled kwargs fail now, not after the predecessors' training
            pred_args = {**base_pred, **extra, **parse_model_kwargs(args.predecessor_kwargs)}
            succ_args = {**succ_args, **parse_model_kwargs(args.successor_kwargs)}
            check_model_kwargs(pred_arch, pred_args, flag='--predecessor-kwargs')
            check_model_kwargs(succ_arch, succ_args, flag='--successor-kwargs')
        except ValueError as e:
            p.error(f'{flavour}: {e}')
        models[flavour] = (family, pred_arch, pred_args, succ_arch, succ_args)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    k = n['probe']
    # the calibration images: the tail of the whole split, whatever --pretrain-images keeps (a subset is ordered by
    # index and balanced by class rank, so its own tail misses classes)
    fm_all = load_demo_split('fashion-mnist', 'train')
    fm_train = fm_all if args.pretrain_images >= len(fm_all[1]) else \
        load_demo_split('fashion-mnist', 'train', args.pretrain_images)
    fm_val = load_demo_split('fashion-mnist', 'validation', 3 * k)
    # held out from every step: the probe's train / test split (the first also the predecessor's test split)
    held_out = fm_val[0][2 * k:2 * k + n['held_out']]
    fm_probe = (fm_val[0][:k], fm_val[1][:k], fm_val[0][k:2 * k], fm_val[1][k:2 * k])
    mnist_probe = (*load_demo_split('mnist5k', 'train', k), *load_demo_split('mnist5k', 'validation', k))
    calib = fm_all[0][-n['calib']:]
    del fm_all
    cfg = dict(pretrain_images=args.pretrain_images, pretrain_epochs=args.pretrain_epochs)

    finetune = dict(epochs=args.finetune_epochs, lr=args.finetune_lr, head_epochs=args.finetune_head_epochs,
                    head_lr=args.finetune_head_lr or args.finetune_lr,
                    images=args.finetune_images) if args.finetune_epochs else None
    rows = []
    for flavour in args.flavours:
        for pred_seed in range(args.predecessor_seeds):
            rows += _flavour_rows(flavour, pred_seed, models[flavour], cfg, args.seeds,
                                  fm_train, (held_out, fm_probe, mnist_probe, fm_val[0][:k], fm_val[1][:k]),
                                  calib if args.calib == 'images' else 'weights', args.methods, finetune)
        print(f'{flavour}: done ({time.perf_counter() - t_start:.0f} s)', flush=True)

    table = _table(rows)
    print(table)
    result = dict(rows=rows, table=table, args=vars(args), pretrain=cfg, seconds=time.perf_counter() - t_start,
                  torch=torch.__version__, timm=timm.__version__)
    write_atomic(args.out / 'real_features_retention.json',
                 lambda tmp: tmp.write_text(json.dumps(result, indent=2, default=str)))
    print(f"wrote {args.out / 'real_features_retention.json'} ({result['seconds']:.0f} s)")


def _flavour_rows(flavour, pred_seed, models, cfg, seeds, fm_train, eval_data, calib, methods=('importance',),
                  finetune=None):
    """The rows of one predecessor: itself (native and resampled to the successor's grid) and its successors,
    recycled by each of ``methods`` (calibrated on the images ``calib``, or 'weights') and at random init, for
    ``seeds`` seeds, each then fine-tuned with the ``_finetune`` options ``finetune`` where given.
    ``models``: (family, predecessor arch, its args, successor arch, its args)."""
    held_out, fm_probe, mnist_probe, test_x, test_y = eval_data
    family, pred_arch, pred_args, succ_arch, succ_args = models
    size = pred_args.get('img_size', IMG)
    data = (_at(fm_train[0], size), fm_train[1], _at(test_x, size), test_y)
    width = pred_args['embed_dim'] if 'embed_dim' in pred_args else pred_args['dims'][0]
    tag = f'{family}{width}_ls_' + flavour.replace(' ', '_')  # 'vit192_ls_layer_scale': the cache's file names
    pred = pretrained_predecessor(pred_args, cfg, data, tag, pred_seed, pred_arch)
    refs = {'cka': pooled_features(pred, [_at(held_out, size)])}
    if size != IMG:  # what the successor can at most keep is what the resampled predecessor still has
        resampled = copy.deepcopy(pred)
        resampled.set_input_size(img_size=IMG, patch_size=succ_args['patch_size'])  # timm's resampling alone
        refs['cka_resampled'] = pooled_features(resampled, [held_out])
    # the successor takes the predecessor's registers, as recycling asks; its prefix tokens keep their position
    # embedding (timm's default), the predecessor's convention is converted exactly (recycle/vit.py, resize)
    if pred_args.get('reg_tokens'):
        succ_args = dict(succ_args, reg_tokens=pred_args['reg_tokens'])
    calib_opts = dict(calib=calib) if isinstance(calib, str) else dict(
        calib=torch.utils.data.TensorDataset(calib), num_calib=len(calib), batch_size=min(32, len(calib)))
    row = dict(flavour=flavour, predecessor_seed=pred_seed)
    # its own test accuracy (head included), on the probe's train split: no step trains on it
    rows = [dict(row, model='predecessor, native', seed=None, accuracy=evaluate(pred, *data[2:]),
                 **_measure(pred, size, refs, held_out, fm_probe, mnist_probe, refs['cka']))]
    if finetune:  # the control: what the predecessor itself reaches with the same fine-tune, once per seed
        mnist_native = tuple(_at(t, size) if t.dim() == 4 else t for t in mnist_probe)
        tuned = [_finetune(copy.deepcopy(pred), mnist_native, seed=seed, **finetune) for seed in range(seeds)]
        rows[-1].update(finetuned=[t['finetuned'] for t in tuned], finetune_accs=[t['finetune_accs'] for t in tuned])
    if size != IMG:
        rows.append(dict(row, model='predecessor, resampled', seed=None,
                         **_measure(resampled, IMG, refs, held_out, fm_probe, mnist_probe, refs['cka_resampled'])))
    # the method in the name unless it is the default alone
    names = {'recycled' + (f' ({m})' if list(methods) != ['importance'] else ''): m for m in methods}
    for seed in range(seeds):
        for name, method in (*names.items(), ('random init', None)):
            torch.manual_seed(seed + 1)  # every successor of a seed starts from the same init
            succ = timm.create_model(succ_arch, **succ_args)
            if method:
                recycle(succ, pred, method=method, seed=seed, measure_retention=False, progress=False, **calib_opts)
            rows.append(dict(row, model=f'successor, {name}', seed=seed, method=method,
                             **_measure(succ, IMG, refs, held_out, fm_probe, mnist_probe)))
            if finetune:
                rows[-1].update(_finetune(succ, mnist_probe, seed=seed, **finetune))
    return rows


def _finetune(model, data, epochs, lr, head_epochs, head_lr, images, seed):
    """Fine-tune ``model`` on ``images`` (None: all; the same subset for every model and seed) of ``data`` (x, y,
    x_test, y_test) with a fresh head (drawn from the same seed for every model of a seed): ``head_epochs`` of the
    head alone (peak learning rate ``head_lr``), then ``epochs`` of all weights (``lr``); the test accuracy after
    each epoch."""
    if images is not None:  # a fixed random subset: the split is ordered by class
        keep = torch.randperm(len(data[0]), generator=torch.Generator().manual_seed(0))[:images]
        data = (data[0][keep], data[1][keep], *data[2:])
    torch.manual_seed(seed + 1)
    model.reset_classifier(10)
    head_accs = []  # the accuracy before training, then after each head epoch
    if head_epochs:
        head = set(model.get_classifier().parameters())
        body = [q for q in model.parameters() if q not in head]
        for q in body:
            q.requires_grad_(False)
        head_accs = train(model, *data, head_epochs, 64, head_lr, seed)
        for q in body:
            q.requires_grad_(True)
    accs = train(model, *data, epochs, 64, lr, seed)  # its first entry: after the head epochs
    return dict(finetuned=accs[-1], finetune_accs=head_accs + accs[1:] if head_accs else accs)


def _cell(values, fmt):
    if len(values) == 1:
        return fmt.format(values[0])
    return f'{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})'


def _tuned_cell(group) -> str:
    """The fine-tuned accuracies of a table row's runs: one per successor, one per seed for a predecessor (whose
    count then differs from the row's runs, and is given)."""
    if 'finetuned' not in group[0]:
        return '-'
    accs = [a for r in group for a in (r['finetuned'] if isinstance(r['finetuned'], list) else [r['finetuned']])]
    return _cell(accs, '{:.1f}') + (f', {len(accs)} runs' if len(accs) != len(group) else '')


def _table(rows) -> str:
    """Markdown: one row per flavour and model, its runs (predecessors x successor seeds) as median (range)."""
    tuned = any('finetuned' in r for r in rows)
    lines = ['| predecessor flavour | model | runs | CKA with the predecessor | CKA with it resampled | '
             'Fashion-MNIST probe % | MNIST-5k probe % |' + (' MNIST-5k fine-tuned % |' if tuned else ''),
             '|---|---|---:|---:|---:|---:|---:|' + ('---:|' if tuned else '')]
    keys = list(dict.fromkeys((r['flavour'], r['model']) for r in rows))
    for flavour, model in keys:
        group = [r for r in rows if (r['flavour'], r['model']) == (flavour, model)]
        if 'accuracy' in group[0]:
            model += f" ({_cell([r['accuracy'] for r in group], '{:.1f}')} % test)"
        resampled = _cell([r['cka_resampled'] for r in group], '{:.3f}') if 'cka_resampled' in group[0] else '-'
        lines.append(f"| {flavour} | {model} | {len(group)} | "
                     f"{_cell([r['cka'] for r in group], '{:.3f}')} | {resampled} | "
                     f"{_cell([r['probe_fm'] for r in group], '{:.1f}')} | "
                     f"{_cell([r['probe_mnist'] for r in group], '{:.1f}')} |"
                     + (f" {_tuned_cell(group)} |" if tuned else ''))
    return '\n'.join(lines)


if __name__ == '__main__':
    main()
