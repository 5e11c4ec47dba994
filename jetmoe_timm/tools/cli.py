""" The ``jetmoe-timm`` command line: one subcommand per feature module.

Each module listed in ``_COMMAND_MODULES`` defines ``add_parser(subparsers)``, which registers its
subcommand and sets ``func`` (called with the parsed args, returns an exit code). Building the parser imports
them all; what ``jetmoe-timm --help`` costs is ``import timm`` (about 4 s here), which the package needs to register
its models.
"""
import argparse
import functools
import importlib
import signal
import sys
import threading
import warnings
from typing import List, Optional

from .._names import closest_name
from ..version import __version__

INTERRUPTED = 128 + signal.SIGINT  # the exit code of a command stopped by Ctrl-C, as a shell reports it

_COMMAND_MODULES = (
    'jetmoe_timm.tools.convert',  # convert
    'jetmoe_timm.tools.visualize',  # inspect
    'jetmoe_timm.tools.push',  # push
    'jetmoe_timm.tools.data',  # data export
    'jetmoe_timm.tools.demo',  # demo
    'jetmoe_timm.tools.bench',  # bench
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with each error in one line (no usage block: ``--help`` has it) and a "did you mean" for a
    misspelled option; exit code 2 as argparse's. Subcommand parsers inherit the class."""

    _argv: List[str] = []  # the arguments this (sub)command parser was given, for the hint below

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hint = self._misspelled_required(message) or self._taken_by_kwargs(message)
        self.exit(2, f'{self.prog}: error: {message}{hint} (see {self.prog} --help)\n')

    def _taken_by_kwargs(self, message: str) -> str:
        """For 'the following arguments are required: model': the words a K=V option ('--model-kwargs', which takes
        every word after it) took that are no K=V, most likely the positional argument written after it."""
        if not message.startswith('the following arguments are required'):
            return ''
        for action in self._actions:
            for flag in action.option_strings if action.metavar == 'K=V' else ():
                if flag not in self._argv:
                    continue
                after = self._argv[self._argv.index(flag) + 1:]
                words = after[:next((i for i, w in enumerate(after) if w.startswith('-')), len(after))]
                taken = [w for w in words if '=' not in w]
                if taken:
                    return (f"; {flag} took {', '.join(repr(w) for w in taken)}, which is no K=V: put {flag} after "
                            f"the positional arguments")
        return ''

    def _misspelled_required(self, message: str) -> str:
        """For 'the following arguments are required: --out': the given flag that was meant for it ('--ouy'),
        which argparse does not mention (it reports missing options before unknown ones)."""
        if not message.startswith('the following arguments are required'):
            return ''
        missing = [o for a in self._actions if a.required for o in a.option_strings if o in message]
        known = {o for a in self._actions for o in a.option_strings}
        for flag in (x.split('=')[0] for x in self._argv if x.startswith('--') and x.split('=')[0] not in known):
            close = closest_name(flag, missing, cutoff=0.75)
            if close:
                return f"; did you mean '{close}' for '{flag}'?"
        return ''

    def unrecognized(self, extra: List[str]):
        """Refuse arguments none of this (sub)command's options take, naming the closest option (or the positional
        argument a flag was written for, as in '--out' for OUT)."""
        positionals = {a.dest: (a.metavar or a.dest).upper() for a in self._actions if not a.option_strings}
        hint = ''
        for flag in (x.split('=')[0] for x in extra if x.startswith('-')):
            dest = flag.lstrip('-').replace('-', '_')
            if dest in positionals:
                hint = f'; {positionals[dest]} is given without a flag'
                break
            close = closest_option(flag, self)
            if close:
                hint = f"; did you mean '{close}'?"
                break
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def closest_option(flag: str, parser: argparse.ArgumentParser) -> Optional[str]:
    """The option of ``parser`` closest to a misspelled ``flag``, None where none is close."""
    options = [o for a in parser._actions for o in a.option_strings]
    return closest_name(flag, options, cutoff=0.75)  # 0.6 paired --bogus with --out


def _command_parser(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.ArgumentParser:
    """The innermost (sub)command parser that ``argv`` names ('jetmoe-timm data export ...' -> export's)."""
    while True:
        subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        i = next((i for i, t in enumerate(argv) if subs is not None and t in subs.choices), None)
        if i is None:
            return parser
        parser, argv = subs.choices[argv[i]], argv[i + 1:]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog='jetmoe-timm', description='MoE Jetpack models for timm.')
    parser.add_argument('--version', action='version', version=f'jetmoe_timm {__version__}')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an error')
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    _add_debug_to_commands(parser)
    return parser


def _add_debug_to_commands(parser: argparse.ArgumentParser) -> None:
    """--debug after the (sub)command too, where a user adds it on seeing an error's hint; SUPPRESS: a command's
    parser leaves the value given before the command alone."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                                     help='show the traceback of an error')
                _add_debug_to_commands(command)


USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)  # their messages say what is wrong and the fix


def error_line(e: BaseException) -> str:
    """An error in one line: its message's first line (with the next one where the first only introduces it, as
    torch's 'Error(s) in loading state_dict for X:'), after the type for errors that are not ``USER_ERRORS``."""
    lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
    first = lines[0]
    if first.endswith(':') and len(lines) > 1:
        first = f'{first} {lines[1]}'
    return first if isinstance(e, USER_ERRORS) else f'{type(e).__name__}: {first}'


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    kind = '' if category is UserWarning else f' ({category.__name__})'
    print(f'jetmoe-timm {command}: warning{kind}: {message}', file=sys.stderr if file is None else file)


def _exit_on_sigterm():
    """Make SIGTERM (``timeout``, schedulers, ``kill``) end the command as an exception does, so that what it was
    writing is removed on the way out (a hidden temporary folder next to ``--out`` otherwise stays); returns the
    handler to restore, or None where the process's signals are not ours to set."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand that was given them, with its options to suggest from
        _command_parser(parser, argv).unrecognized(extra)
    previous = _exit_on_sigterm()
    try:
        with warnings.catch_warnings():
            if not args.debug:  # a warning in one line as errors are, not with the source line that raised it
                warnings.showwarning = functools.partial(_show_warning, args.command)
            return int(args.func(args) or 0)
    except Exception as e:  # every failure: one line (the traceback only with --debug), exit code 2
        if args.debug:
            raise
        print(f'jetmoe-timm {args.command}: error: {error_line(e)}' + ('' if isinstance(e, USER_ERRORS) else
                                                                        ' (--debug shows the traceback)'),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was being written is removed on the way here; no traceback
        print(f'jetmoe-timm {args.command}: interrupted', file=sys.stderr)
        return INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    sys.exit(main())
