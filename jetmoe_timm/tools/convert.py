""" ``jetmoe-timm convert``: the command-line face of checkpoint recycling. """
from pathlib import Path

from ..export import is_model_folder, read_provenance

from ..recycle.engine import CALIB_SIZES, RECIPES, RECYCLE_DEFAULTS, RETENTION_IMAGES
from ..recycle.selection import METHODS
from ..recycle.stats import STATISTICS
from .checks import check_model_kwargs, check_output_folder, parse_model_kwargs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'convert', help='recycle a dense timm checkpoint into a JetMoE model folder',
        description='Recycle a dense timm checkpoint into JetMoE weights and write a folder that '
                    "timm.create_model('local-dir:OUT', pretrained=True) loads after import jetmoe_timm.")
    p.add_argument('model', help="JetMoE model, optionally with its tag, e.g. 'v_jetmoe_tiny'")
    p.add_argument('--out', required=True, help='output folder: new or empty, or an earlier output with --overwrite')
    p.add_argument('--from-official', default=None, metavar='FILE',
                   help='convert an official MoE Jetpack checkpoint (.pt / .pth / .safetensors) instead of recycling')
    add_convert_arguments(p)
    p.set_defaults(func=run)


# every recycling option of ``convert``, with its default; ``push`` shares them
CONVERT_DEFAULTS = dict(predecessor=None, body_predecessor=None, **RECYCLE_DEFAULTS)


def add_convert_arguments(parser, defaults: bool = True) -> None:
    """The recycling options (and --model-kwargs, --overwrite, --no-progress) on ``parser``.

    With ``defaults=False`` every option defaults to None, so a caller can tell which ones were given.
    """
    d = CONVERT_DEFAULTS if defaults else dict.fromkeys(CONVERT_DEFAULTS)
    c = CONVERT_DEFAULTS  # the defaults as help states them, also where the parser's own are None
    parser.add_argument('--predecessor', default=d['predecessor'], metavar='SPEC',
                        help="timm name, hf-hub:..., local-dir:..., a folder or a checkpoint file (default: the "
                             "tag's predecessor)")
    parser.add_argument('--body-predecessor', default=d['body_predecessor'], metavar='SPEC',
                        help="--recipe official only: the dense model of the successor's width whose body is copied "
                             "(default: the tag's)")
    parser.add_argument('--method', default=d['method'], choices=METHODS,
                        help=f"how the experts take hidden neurons from the predecessor's MLPs (default: {c['method']})")
    parser.add_argument('--recipe', default=d['recipe'], choices=RECIPES,
                        help="paper: one predecessor, the same residual channels everywhere; official: the official "
                             f"ViT tool's body-plus-experts recipe (default: {c['recipe']})")
    parser.add_argument('--statistic', default=d['statistic'], choices=STATISTICS,
                        help=f"the activation statistic that ranks hidden neurons (default: {c['statistic']})")
    parser.add_argument('--calib', default=d['calib'], metavar='SOURCE',
                        help="'synthetic' (built-in), 'weights' (data-free) or a folder of images "
                             f"(default: {c['calib']})")
    parser.add_argument('--num-calib', type=int, default=d['num_calib'], metavar='N',
                        help=f"calibration images (default: {c['num_calib']})")
    parser.add_argument('--calib-size', default=d['calib_size'], choices=CALIB_SIZES,
                        help="take statistics at the successor's input size (the predecessor resampled to its "
                             f"grid) or at the predecessor's own (default: {c['calib_size']})")
    parser.add_argument('--batch-size', type=int, default=d['batch_size'], metavar='N',
                        help=f"calibration images per batch (default: {c['batch_size']})")
    parser.add_argument('--seed', type=int, default=d['seed'], metavar='N',
                        help=f"seed of the sampling and of the weights that are not recycled (default: {c['seed']})")
    parser.add_argument('--model-kwargs', nargs='*', default=[] if defaults else None, metavar='K=V',
                        help="the variant's kwargs to change, e.g. embed_dim=96")
    parser.add_argument('--overwrite', action='store_true', help='replace an earlier output folder')
    parser.add_argument('--no-progress', action='store_true',
                        help='no progress bar (none is drawn where stderr is not a terminal)')


def run(args) -> int:
    from ..recycle.folder import convert
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    recycling = [k for k, default in CONVERT_DEFAULTS.items() if getattr(args, k) != default]
    if args.from_official and recycling:  # silently unused otherwise
        flags = ', '.join('--' + k.replace('_', '-') for k in recycling)
        raise ValueError(f'{flags}: recycling options do not apply to --from-official (the checkpoint is already '
                         f'an MoE model); drop them.')
    # before the (long) conversion, not after
    check_output_folder(args.out, args.overwrite, owned=is_model_folder, what='a converted model',
                        overwrite_flag='--overwrite')
    check_model_kwargs(args.model, model_kwargs)
    if args.from_official:
        from ..official import convert_official_checkpoint
        out = convert_official_checkpoint(args.from_official, args.out, model_name=args.model.partition('.')[0],
                                          overwrite=args.overwrite, **model_kwargs)
    else:
        options = {k: getattr(args, k) for k in CONVERT_DEFAULTS}
        out = convert(args.model, args.out, model_kwargs=model_kwargs, overwrite=args.overwrite,
                      progress=not args.no_progress, **options)
    kept = (read_provenance(Path(out) / 'model.safetensors').get('retention') if not args.from_official else None)
    if kept:
        few = kept['images'] < kept.get('features', 0)  # CKA of fewer samples than dimensions reads high
        more = (f', or calibrate on more images (it uses up to {RETENTION_IMAGES}: --num-calib, and a --calib folder '
                f'that holds them)' if kept['images'] < RETENTION_IMAGES else '')
        print(f"retention: linear CKA with the predecessor's features {kept['cka']:.3f} (random init "
              f"{kept['cka_scratch']:.3f}) on {kept['images']} calibration images"
              + (f"; on fewer images than its {kept['features']} feature dimensions CKA reads high for any model: "
                 f"read it against the random-init figure{more}" if few else ''))
    print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True) after import jetmoe_timm")
    return 0
