""" Run timm's own ``train.py`` / ``validate.py`` with the jetmoe_timm models registered.

timm's scripts live in the timm repository, not in the timm wheel, and ``validate.py`` has no option to import
a plugin. The launchers (``python -m jetmoe_timm.train``, ``jetmoe-timm-train``, and the ``validate``
counterparts) import ``jetmoe_timm`` (which registers the models), find the script, and run it as ``__main__``
with the remaining command-line arguments, so every option of the script works unchanged. No copy of timm's
scripts is shipped here.
"""
import argparse
import contextlib
import ctypes
import functools
import importlib
import importlib.metadata
import io
import os
import platform
import re
import runpy
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
from safetensors import SafetensorError

from ..models import JetMoEMixin
from ._script_checks import ALLOCATOR_ENV, ALLOCATOR_OFF, argument_problem, config_problem, one_model, \
    preprocessing_note
from .cli import INTERRUPTED, USER_ERRORS, closest_option, error_line

__all__ = ['SCRIPTS_ENV', 'find_timm_script', 'run_timm_script', 'keep_freed_memory']

SCRIPTS_ENV = 'JETMOE_TIMM_SCRIPTS'
_SCRIPTS_OPT = '--timm-scripts'
_TIMM_REPO = 'https://github.com/huggingface/pytorch-image-models'


def _how_to_get(script: str) -> str:
    return (
        f"timm's {script} is not part of the timm package: it lives in the timm repository. Get the scripts for "
        f"your timm ({timm.__version__}) and point at them:\n"
        f"    git clone --depth 1 --branch v{timm.__version__} {_TIMM_REPO}\n"
        f"    export {SCRIPTS_ENV}=$PWD/pytorch-image-models    # or pass {_SCRIPTS_OPT} pytorch-image-models\n"
        f"(drop --branch to use the newest scripts if no tag matches.)"
    )


def find_timm_script(script: str, scripts_dir: Optional[os.PathLike] = None) -> Path:
    """Path of timm's ``script`` (e.g. 'train.py') in ``scripts_dir`` or else ``$JETMOE_TIMM_SCRIPTS``.

    Either may name a timm repository checkout or any folder holding the scripts.
    Raises FileNotFoundError, saying how to get the scripts, when it is not there.
    """
    where = scripts_dir if scripts_dir is not None else os.environ.get(SCRIPTS_ENV)
    if not where:
        raise FileNotFoundError(f'No timm scripts folder given ({_SCRIPTS_OPT} DIR or ${SCRIPTS_ENV}). '
                                + _how_to_get(script))
    path = Path(where).expanduser() / script
    if not path.is_file():
        origin = _SCRIPTS_OPT if scripts_dir is not None else f'${SCRIPTS_ENV}'
        raise FileNotFoundError(f'{path} not found ({origin}={where}). ' + _how_to_get(script))
    return path.resolve()


def _check_timm(scripts_dir: Path) -> None:
    """Warn when the imported timm is not the installed one, or the scripts come from another timm version.

    ``python -m ...`` puts the working directory first on ``sys.path``; run from inside a timm checkout, the
    checkout's ``timm/`` then shadows the installed wheel. The launcher has already imported timm by the time the
    script runs, so the script uses that same module, whichever it is.
    """
    imported = Path(timm.__file__).resolve().parent
    try:
        installed = Path(importlib.metadata.distribution('timm').locate_file('timm')).resolve()
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.is_dir() and installed != imported:
        warnings.warn(
            f'timm was imported from {imported} (version {timm.__version__}), not from the installed package at '
            f'{installed}: the working directory is probably a timm checkout that is first on sys.path. Run from '
            f'another directory, or use the jetmoe-timm-train / jetmoe-timm-validate commands.', stacklevel=3)
    version_file = scripts_dir / 'timm' / 'version.py'  # present when scripts_dir is a timm checkout
    found = version_file.is_file() and re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", version_file.read_text())
    if found and found.group(1) != timm.__version__:
        warnings.warn(
            f"timm's scripts in {scripts_dir} come from timm {found.group(1)} but timm {timm.__version__} is in "
            f"use; if the script fails on an import or an option, use the scripts of the matching release "
            f"(git clone --depth 1 --branch v{timm.__version__} {_TIMM_REPO}).", stacklevel=3)


def _allow_cpu_ddp() -> None:
    """Let timm's ``train.py`` run DDP on CPU (``torchrun ... --device cpu``, gloo backend).

    ``train.py`` wraps the model with ``DistributedDataParallel(model, device_ids=[device])`` whatever the device,
    and torch rejects ``device_ids`` for a CPU module ("device_ids and output_device arguments only work with
    single-device/multiple-device GPU modules"). For CPU devices DDP must get ``device_ids=None``; GPU device ids
    pass through untouched. Applied only by the train launcher, only in a distributed run.
    """
    from torch.nn.parallel import DistributedDataParallel

    init = DistributedDataParallel.__init__
    if getattr(init, '_jetmoe_cpu_ddp', False):
        return

    @functools.wraps(init)
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids = None
        init(self, module, device_ids, *args, **kwargs)

    __init__._jetmoe_cpu_ddp = True
    DistributedDataParallel.__init__ = __init__


# glibc's mallopt parameters (malloc.h), and their defaults (man mallopt)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MALLOPT_DEFAULTS = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 128 * 1024), (_M_TRIM_THRESHOLD, 128 * 1024))
_restores_in_children = False


def _restore_malloc_defaults(libc) -> None:
    """glibc's default mallopt settings, in a child forked from a process that keeps freed memory: DataLoader workers
    decode images and gain nothing from holding their peak. (Only the dynamic mmap threshold stays off: once set,
    glibc has no way back to it.)"""
    for param, value in _MALLOPT_DEFAULTS:
        libc.mallopt(param, value)


def keep_freed_memory() -> Optional[str]:
    """Make glibc's malloc keep freed memory in this process, as ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=1000000000000`` would: no allocation is served by its own mmap (large tensors are
    otherwise mapped, and their pages faulted in and zeroed, anew on every training step) and the heap is never
    trimmed. timm's train.py on the CPU: V-JetMoE-S / C-JetMoE-T steps 1.3x / 2.2x faster with ``adafactorlean``
    for 2-4 % more peak memory, V-JetMoE-T and ViT-T steps 5-20 % faster with timm's Adafactor or train.py's
    default AdamW (docs/benchmark.md, "CPU allocator"); the process's memory stays at its peak until it ends. Only for
    a process that trains: the train launcher calls it for CPU runs, and children forked later (DataLoader workers) get
    glibc's defaults back. Returns why it did nothing (another libc, or the user chose an allocator), else None.
    """
    if os.environ.get(ALLOCATOR_ENV, '').lower() in ALLOCATOR_OFF:
        return f'{ALLOCATOR_ENV}={os.environ[ALLOCATOR_ENV]}'
    chosen = [k for k in os.environ if k.startswith('MALLOC_') or k == 'LD_PRELOAD' and os.environ[k]
              or k == 'GLIBC_TUNABLES' and 'malloc' in os.environ[k]]
    if chosen:
        return f'{chosen[0]} is set'
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'not glibc'
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):  # -1: never trim (man mallopt)
        return 'mallopt refused'
    global _restores_in_children
    if not _restores_in_children:  # forked children (train.py's --workers) inherit the settings: undo them there
        os.register_at_fork(after_in_child=functools.partial(_restore_malloc_defaults, libc))
        _restores_in_children = True
    return None


def _split_scripts_opt(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """Take ``--timm-scripts DIR`` / ``--timm-scripts=DIR`` out of ``argv``; the rest goes to timm's script."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--':  # everything after belongs to the script
            rest.extend(argv[i:])
            break
        if arg == _SCRIPTS_OPT:
            if i + 1 >= len(argv) or argv[i + 1].startswith('-'):  # not the option after it taken as the folder
                raise ValueError(f'{_SCRIPTS_OPT} needs a folder: {_SCRIPTS_OPT} DIR.')
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(_SCRIPTS_OPT + '='):
            value = arg.split('=', 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def _parse_script_args(path: Path, argv: List[str]) -> Tuple[Optional[argparse.Namespace], Optional[str]]:
    """(``argv`` as the script itself reads it: its own parser, with train.py's ``--config`` YAML file applied,
    None) or, for arguments its parser refuses, (None, argparse's message, a misspelled option with the closest
    one: the script would print its whole usage, 96 lines for train.py). (None, None) where the script defines no
    parser or cannot be read (it then says why itself), and for --help (the script prints it)."""
    namespace = runpy.run_path(str(path), run_name='_jetmoe_timm_args')  # defines the parsers; main() is not run
    parser = namespace.get('parser')
    saved_argv, err = sys.argv, io.StringIO()
    sys.argv = [str(path)] + argv
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            if callable(namespace.get('_parse_args')):  # train.py: --config file, then the command line
                args = namespace['_parse_args']()
                return (args[0] if isinstance(args, tuple) else args), None
            return (parser.parse_args(argv) if isinstance(parser, argparse.ArgumentParser) else None), None
    except SystemExit as e:
        message = next((line.split(': error: ', 1)[1] for line in reversed(err.getvalue().splitlines())
                        if ': error: ' in line), None)
        if e.code != 2 or message is None:
            return None, None
        extra = message.partition('unrecognized arguments: ')[2].split()
        flags = [x.split('=')[0] for x in extra if x.startswith('--')]
        close = next(filter(None, (closest_option(flag, parser) for flag in flags)), None) \
            if isinstance(parser, argparse.ArgumentParser) else None
        return None, message + (f"; did you mean '{close}'?" if close else '')
    except Exception:
        return None, None
    finally:
        sys.argv = saved_argv


_LOADERS = (('timm.models', 'create_model'), ('timm.models', 'load_checkpoint'),
            ('timm.task', 'resume_task_checkpoint'))
DEBUG_ENV = 'JETMOE_TIMM_DEBUG'  # set: the launchers show the traceback of such an error


class _LoadError(Exception):
    """An error building the model or loading a checkpoint inside the script, already put in one line."""


@contextlib.contextmanager
def _loading_errors_in_one_line():
    """While the script runs, an error of a user's model, weights or checkpoint (the wrong file, a damaged one, a
    dense checkpoint for a JetMoE model, a folder without config.json, offline) ends it in one line, as the
    jetmoe-timm commands do, not a traceback from the script's depths. Errors in training itself keep theirs."""
    def one_line(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS + (SafetensorError,) as e:  # the latter: a damaged file the early check let through
                if os.environ.get(DEBUG_ENV):
                    raise
                raise _LoadError(error_line(e)) from e
        return call

    originals = [(importlib.import_module(module), name) for module, name in _LOADERS]
    originals = [(module, name, getattr(module, name)) for module, name in originals if hasattr(module, name)]
    for module, name, fn in originals:
        setattr(module, name, one_line(_describing_mismatch(fn) if name == 'load_checkpoint' else fn))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def _describing_mismatch(load_checkpoint):
    """timm's ``load_checkpoint``, whose failed strict load of another model's checkpoint (a dense one, say) into a
    JetMoE model says what the checkpoint holds and the fix, as ``--pretrained-path`` does, not torch's list of
    every key."""
    @functools.wraps(load_checkpoint)
    def call(model, checkpoint_path, *args, **kwargs):
        try:
            return load_checkpoint(model, checkpoint_path, *args, **kwargs)
        except RuntimeError:
            if isinstance(model, JetMoEMixin):  # raises its description where the checkpoint is another model's
                state = timm.models.load_state_dict(checkpoint_path)
                model.check_checkpoint(state)
                head = model.pretrained_cfg.get('classifier')
                if head and f'{head}.weight' not in state and getattr(model.get_classifier(), 'weight', None) is not None:
                    raise ValueError(  # recycled weights (num_classes=0) scored with a classifier nobody trained
                        f'{checkpoint_path} has no classifier (a recycled init has none): fine-tune it first '
                        f'(jetmoe-timm-train ... --pretrained-path {checkpoint_path}), then validate that run\'s '
                        f'checkpoint.') from None
            raise
    return call


@contextlib.contextmanager
def _noting_interrupts(noted: List[int]):
    """Note Ctrl-C (SIGINT) in ``noted`` while timm's script runs, which still gets its KeyboardInterrupt: train.py
    catches it and finishes as if training had ended, so without this a stopped run exits 0 like a finished one.
    Only in the main thread, and only where SIGINT has Python's own handler."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def on_sigint(signum, frame):
        noted.append(signum)
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without the launcher

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_timm_script(script: str, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run timm's ``script`` as ``__main__`` with ``argv`` (default: ``sys.argv[1:]``), jetmoe_timm's models and
    optimizer registered (importing this module imported the package).

    ``--timm-scripts DIR`` in ``argv`` is consumed here; all other arguments are passed through unchanged.
    Returns 0 when the script returns, 2 when it cannot be found, 130 (``INTERRUPTED``) when Ctrl-C stopped it
    (train.py finishes its run after a KeyboardInterrupt; a KeyboardInterrupt that reaches here propagates to a
    Python caller); ``sys.exit`` in the script (argparse errors included) propagates as SystemExit. Run as a
    command (``argv`` None), CPU training keeps freed memory in the process (``keep_freed_memory``).
    """
    prog = prog or f'jetmoe-timm {script}'
    command = argv is None  # run as a command: this process is the training run, not a caller's
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        scripts_dir, argv = _split_scripts_opt(argv)
        path = find_timm_script(script, scripts_dir)
    except (ValueError, FileNotFoundError) as e:
        if {'-h', '--help'} & set(argv):  # the options are train.py's own: say what the launcher is, and where they are
            print(f"usage: {prog} [{_SCRIPTS_OPT} DIR] [any option of timm's {script} ...]\n\nRuns timm's {script} "
                  f"with the jetmoe_timm models registered; its options are listed by {prog} --help once the script "
                  f"is found. {e}")
            return 0
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 2
    _check_timm(path.parent)
    problem = config_problem(argv) if script == 'train.py' else None
    args, refused = (None, None) if problem else _parse_script_args(path, argv)
    if refused:
        print(f'{prog}: error: {refused} (see {prog} --help)', file=sys.stderr)
        return 2
    problem = problem or argument_problem(args, script)
    if problem:
        print(f'{prog}: error: {problem}', file=sys.stderr)
        return 2
    note = preprocessing_note(args) if script == 'validate.py' else None
    if note:
        print(f'{prog}: {note}', file=sys.stderr)
    if script == 'train.py' and 'WORLD_SIZE' in os.environ:  # started by torchrun
        _allow_cpu_ddp()
    if command and script == 'train.py' and str(getattr(args, 'device', '')).startswith('cpu'):
        if keep_freed_memory() is None and os.environ.get('RANK', '0') == '0':  # every rank keeps; rank 0 says so
            print(f'{prog}: CPU training keeps freed memory in the process (faster steps, memory held at its peak; '
                  f'{ALLOCATOR_ENV}=default turns this off)', file=sys.stderr)

    saved_argv = sys.argv
    sys.argv = [str(path)] + argv
    # one model, one checkpoint: validate.py records a failing model (or checkpoint) of many and goes on
    one = one_model(getattr(args, 'model', None)) and not os.path.isdir(getattr(args, 'checkpoint', None) or '')
    one_line = _loading_errors_in_one_line() if one else contextlib.nullcontext()
    interrupted: List[int] = []
    started = time.time()  # checkpoints written since are this run's
    try:
        with one_line, _noting_interrupts(interrupted):
            # run_path leaves sys.path alone for a file, so the script's folder never shadows the installed timm
            runpy.run_path(str(path), run_name='__main__')
    except _LoadError as e:
        print(f'{prog}: error: {e} ({DEBUG_ENV}=1 shows the traceback)', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not command:
            raise
        interrupted.append(signal.SIGINT)
    finally:
        sys.argv = saved_argv
    if interrupted:
        print(f'{prog}: interrupted (Ctrl-C){_resume_hint(args, started) if script == "train.py" else ""}',
              file=sys.stderr)
        return INTERRUPTED
    return 0


def _resume_hint(args: argparse.Namespace, since: float) -> str:
    """What an interrupted train.py run left to resume from: the ``last.pth.tar`` it wrote at the end of its last
    finished epoch (in ``--output``/``--experiment``, or the newest run folder there when the name was generated)."""
    base = Path(getattr(args, 'output', '') or './output/train')
    experiment = getattr(args, 'experiment', '')
    candidates = [base / experiment / 'last.pth.tar'] if experiment else list(base.glob('*/last.pth.tar'))
    written = [p for p in candidates if p.is_file() and p.stat().st_mtime >= since]
    if not written:
        return ' before it finished an epoch: no checkpoint was saved'
    return f'; to go on from its last finished epoch, run it again with --resume {max(written, key=os.path.getmtime)}'
