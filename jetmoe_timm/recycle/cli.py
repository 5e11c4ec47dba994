""" ``jetmoe-timm convert``: the command-line face of checkpoint recycling. """
import argparse

from .engine import RECIPES
from .selection import METHODS
from .stats import STATISTICS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'convert', help='recycle a dense timm checkpoint into a JetMoE model folder',
        description='Recycle a dense timm checkpoint into JetMoE weights and write a folder that '
                    "timm.create_model('local-dir:OUT', pretrained=True) loads after import jetmoe_timm.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('model', help="JetMoE model, optionally with its tag, e.g. 'v_jetmoe_tiny'")
    p.add_argument('--out', required=True, help='output folder (must not exist unless --overwrite)')
    p.add_argument('--predecessor', default=None,
                   help="timm name, hf-hub:..., local-dir:... or a checkpoint file (default: the tag's)")
    p.add_argument('--body-predecessor', default=None, help="the official recipe's same-width body model")
    p.add_argument('--from-official', default=None, metavar='FILE',
                   help='convert an official MoE Jetpack .pt/.pth checkpoint instead of recycling')
    p.add_argument('--method', default='importance', choices=METHODS)
    p.add_argument('--recipe', default='paper', choices=RECIPES)
    p.add_argument('--statistic', default='l2', choices=STATISTICS)
    p.add_argument('--calib', default='synthetic',
                   help="'synthetic' (built-in), 'weights' (data-free) or a folder of images")
    p.add_argument('--num-calib', type=int, default=256, help='calibration images')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='model kwargs, e.g. embed_dim=96')
    p.add_argument('--overwrite', action='store_true')
    p.add_argument('--no-progress', action='store_true')
    p.set_defaults(func=run)


def run(args) -> int:
    from .convert import convert, parse_model_kwargs
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    if args.from_official:
        from ..official import convert_official_checkpoint
        out = convert_official_checkpoint(args.from_official, args.out, model_name=args.model.partition('.')[0],
                                          overwrite=args.overwrite, **model_kwargs)
    else:
        out = convert(args.model, args.out, model_kwargs=model_kwargs, predecessor=args.predecessor,
                      body_predecessor=args.body_predecessor, overwrite=args.overwrite,
                      progress=not args.no_progress, method=args.method, recipe=args.recipe,
                      statistic=args.statistic, calib=args.calib, num_calib=args.num_calib,
                      batch_size=args.batch_size, seed=args.seed)
    print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True) after import jetmoe_timm")
    return 0
