""" The ``jetmoe-timm`` command line: one subcommand per feature module.

Each module listed in ``_COMMAND_MODULES`` defines ``add_parser(subparsers)``, which registers its
subcommand and sets ``func`` (called with the parsed args, returns an exit code). Building the parser imports
them all; what ``jetmoe-timm --help`` costs is ``import timm`` (about 4 s here), which the package needs to register
its models.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from ..version import __version__

_COMMAND_MODULES = (
    'jetmoe_timm.tools.convert',  # convert
    'jetmoe_timm.tools.visualize',  # inspect
    'jetmoe_timm.tools.push',  # push
    'jetmoe_timm.tools.data',  # data export
    'jetmoe_timm.tools.demo',  # demo
    'jetmoe_timm.tools.bench',  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='jetmoe-timm', description='MoE Jetpack models for timm.')
    parser.add_argument('--version', action='version', version=f'jetmoe_timm {__version__}')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


_USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)  # their messages say what is wrong and the fix


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:  # every failure: one line (the traceback only with --debug), exit code 2
        if args.debug:
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        what = lines[0] if isinstance(e, _USER_ERRORS) else f'{type(e).__name__}: {lines[0]}'
        print(f'jetmoe-timm {args.command}: error: {what}' + ('' if isinstance(e, _USER_ERRORS) else
                                                                 ' (--debug shows the traceback)'), file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
