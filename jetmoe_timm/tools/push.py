""" ``jetmoe-timm push``: convert (or take a converted folder), write the model card and upload to the Hub. """
from pathlib import Path

import timm

from ..hub import check_push, default_repo_problem, push_to_hub
from ..export import is_model_folder
from ..models._pretrained import architecture_signature
from ..recycle import convert
from ..recycle.build import predecessor_spec, recycle_source
from ..recycle.engine import RECYCLE_DEFAULTS
from .convert import CONVERT_DEFAULTS, add_convert_arguments
from .checks import check_model_kwargs, check_output_folder, parse_model_kwargs

__all__ = ['add_parser']


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        'push', help='publish converted weights (+ model card) to the Hugging Face Hub',
        description='Convert MODEL (or take a converted folder with --from), write its model card, and upload '
                    'model.safetensors, config.json and README.md to the Hub. Afterwards '
                    "timm.create_model('hf-hub:ORG/NAME', pretrained=True) loads it after import jetmoe_timm.")
    p.add_argument('model', nargs='?', default=None,
                   help="JetMoE model with optional tag, e.g. 'v_jetmoe_tiny' (optional with --from)")
    p.add_argument('--repo-id', default=None, metavar='ORG/NAME', help="target repo (default: the tag's hf_hub_id)")
    p.add_argument('--from', dest='from_dir', default=None, metavar='DIR',
                   help='push this converted folder instead of converting (README.md is written into it)')
    p.add_argument('--private', action='store_true', help='create the repo as private')
    p.add_argument('--revision', default=None, metavar='BRANCH',
                   help='branch to push to (created if missing; default: main)')
    p.add_argument('--dry-run', action='store_true', help='write the folder and card, print the upload, send nothing')
    p.add_argument('--commit-message', default=None, metavar='MSG')
    p.add_argument('--endpoint', default=None, metavar='URL', help='Hub URL (default: HF_ENDPOINT or https://huggingface.co)')
    p.add_argument('--card-template', default=None, metavar='FILE',
                   help='model card template (default: the family\'s model_cards/<family>.md, e.g. v_jetmoe.md)')
    g = p.add_argument_group('conversion (without --from; defaults as in `jetmoe-timm convert`)')
    g.add_argument('--out', default=None, metavar='DIR', help='folder to convert into (default: ./<repo name> of --repo-id, else ./MODEL)')
    add_convert_arguments(g, defaults=False)
    p.set_defaults(func=run)


def _convert_for_push(args) -> Path:
    if args.model is None:
        raise ValueError('give MODEL to convert (e.g. v_jetmoe_tiny), or --from DIR with a converted folder.')
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    check_model_kwargs(args.model, model_kwargs)
    # what would refuse the push afterwards (repo id, card template, token, offline, no Hub answering) refuses it
    # now, before the conversion writes --out
    check_push(args.model, args.repo_id, revision=args.revision, dry_run=args.dry_run,
               card_template=args.card_template, endpoint=args.endpoint)
    if args.repo_id is None:  # the tag's default repo takes its own recipe only: fail now, not after converting
        full, source = recycle_source(args.model)
        requested = dict(predecessor=predecessor_spec(source, args.predecessor),
                         **{k: getattr(args, k) or RECYCLE_DEFAULTS[k] for k in ('method', 'recipe')})
        problem = default_repo_problem(full, requested)
        if problem:
            raise ValueError(f'--repo-id not given: {problem}.')
    if args.repo_id is None and model_kwargs:  # fail now, not after a long conversion
        default = timm.create_model(args.model, device='meta')
        changed = timm.create_model(args.model, device='meta', **model_kwargs)
        if architecture_signature(default) != architecture_signature(changed):
            raise ValueError(f"--model-kwargs change the architecture of '{args.model}': its default repo must "
                             f"hold the default architecture, so pass your own --repo-id ORG/NAME.")
    out = check_output_folder(args.out or (args.repo_id or args.model).split('/')[-1], args.overwrite,
                              owned=is_model_folder, what='a converted model', overwrite_flag='--overwrite')
    options = {k: getattr(args, k) for k in CONVERT_DEFAULTS if getattr(args, k) is not None}
    return convert(args.model, out, model_kwargs=model_kwargs, overwrite=args.overwrite,
                   progress=not args.no_progress, **options)


def run(args) -> int:
    if args.from_dir:
        given = [k for k in (*CONVERT_DEFAULTS, 'out', 'model_kwargs') if getattr(args, k) is not None]
        if given or args.overwrite:
            flags = ', '.join('--' + k.replace('_', '-') for k in given + (['overwrite'] if args.overwrite else []))
            raise ValueError(f'{flags}: conversion options do not apply to --from (the folder is already converted).')
        folder = Path(args.from_dir)
    else:
        folder = _convert_for_push(args)
    r = push_to_hub(folder, args.repo_id, model_name=args.model, private=args.private, revision=args.revision,
                    dry_run=args.dry_run, endpoint=args.endpoint, commit_message=args.commit_message,
                    card_template=args.card_template)
    for n, size in r.files:
        print(f'  {n:<18} {size:>14,d} bytes')
    target = f'{r.url} (revision {r.revision})'
    if args.dry_run:
        print(f'dry run: would upload these files from {r.folder} to {target}; nothing was sent.')
        from huggingface_hub import get_token
        if not get_token():
            print('note: no Hugging Face token found: run `hf auth login` (or set HF_TOKEN) before a real push.')
    elif r.changed:
        print(f'pushed {r.folder} to {target}: commit {r.commit}')
    else:
        print(f'{target} already has these files: no new commit (head {r.commit})')
    at = '' if r.revision == 'main' else f'@{r.revision}'
    print(f"load it with: import jetmoe_timm; timm.create_model('hf-hub:{r.repo_id}{at}', pretrained=True)")
    return 0
