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
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import timm
import torch
from safetensors import SafetensorError

from .._names import did_you_mean
from ..models import JetMoEMixin, list_jetmoe_models
from ..models._pretrained import architecture_signature, recorded_input_contract
from ..export import read_model_config, verify_safetensors
from .checks import check_model_kwargs, check_output_folder
from .cli import INTERRUPTED, USER_ERRORS, closest_option, error_line

__all__ = ['SCRIPTS_ENV', 'ALLOCATOR_ENV', 'find_timm_script', 'run_timm_script', 'keep_freed_memory']

SCRIPTS_ENV = 'JETMOE_TIMM_SCRIPTS'
ALLOCATOR_ENV = 'JETMOE_TIMM_ALLOCATOR'
_ALLOCATOR_OFF = ('default', 'off')  # its values (any case) that leave glibc's malloc as it is
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
    if os.environ.get(ALLOCATOR_ENV, '').lower() in _ALLOCATOR_OFF:
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


def _config_problem(argv: List[str]) -> Optional[str]:
    """train.py's ``-c`` / ``--config`` YAML file that is not there (train.py: a traceback, and no other argument can
    be read before it)."""
    for i, arg in enumerate(argv):
        if arg == '--':
            break
        value = argv[i + 1] if arg in ('-c', '--config') and i + 1 < len(argv) else (
            arg.split('=', 1)[1] if arg.startswith('--config=') else None)
        if value and not os.path.isfile(value):
            return f'--config {value} does not exist: pass an existing YAML file (the recipes: recipes/*.yaml).'
    return None


def _default_cfg(model: Optional[str]):
    """The default pretrained cfg of a timm model name: what the scripts take the data size (without --img-size)
    and the classes (without --num-classes) from. None for hub / local names and unknown models or tags (the
    script says so itself)."""
    if not model or ':' in model or not timm.is_model(model.partition('.')[0]):
        return None
    try:
        return timm.models.get_pretrained_cfg(model)
    except (RuntimeError, ValueError):
        return None


# the scripts' file arguments, read before anything runs (train.py: the first three; validate.py: --checkpoint)
_FILE_ARGS = ('pretrained_path', 'initial_checkpoint', 'resume', 'checkpoint')
# create_model arguments train.py / validate.py pass themselves, with the option that sets them: in --model-kwargs
# too, the call gets them twice (a TypeError inside the script)
_SCRIPT_MODEL_ARGS = {'num_classes': '--num-classes', 'in_chans': '--in-chans', 'global_pool': '--gp',
                      'scriptable': '--torchscript', 'pretrained': '--pretrained'}
_TRAIN_MODEL_ARGS = {'drop_rate': '--drop', 'drop_path_rate': '--drop-path', 'drop_block_rate': '--drop-block',
                     'bn_momentum': '--bn-momentum', 'bn_eps': '--bn-eps', 'checkpoint_path': '--initial-checkpoint'}


def _local_dir_config(model: Optional[str]) -> Tuple[Optional[dict], Optional[str]]:
    """(config.json, None) of a ``local-dir:`` model, or (None, why it cannot be read); (None, None) for others."""
    if not model or not model.startswith('local-dir:'):
        return None, None
    try:
        return read_model_config(model.partition(':')[2], 'pass the folder jetmoe-timm convert wrote (config.json and '
                                                          'model.safetensors).'), None
    except (OSError, ValueError) as e:
        return None, f'--model {model}: {e}'



def _default_classes(cfg, config: Optional[dict]) -> Optional[int]:
    """The classes a model builds without --num-classes, from its default pretrained ``cfg`` or a ``local-dir:``
    folder's ``config`` (config.json); None where that cannot be said here (hf-hub: names, unknown models)."""
    if cfg is not None:
        return cfg.num_classes
    classes = (config or {}).get('num_classes')
    return classes if isinstance(classes, int) else None


def _run_args(checkpoint: Optional[str]) -> Optional[dict]:
    """The args.yaml train.py wrote beside ``checkpoint`` (its run's options), None where there is none."""
    try:
        import yaml  # the scripts need it too
    except ImportError:
        return None
    if not checkpoint:
        return None
    try:
        run = yaml.safe_load((Path(checkpoint).parent / 'args.yaml').read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return run if isinstance(run, dict) else None  # not train.py's otherwise


def _built_signature(model: str, num_classes: Optional[int], model_kwargs: Optional[dict]) -> Optional[dict]:
    """``architecture_signature`` of the model a script builds from these options (on the meta device), None where
    it cannot be built here (the script then says why)."""
    try:
        kwargs = dict(model_kwargs or {}, **({'num_classes': num_classes} if num_classes is not None else {}))
        built = timm.create_model(model, device='meta', **kwargs)
    except Exception:
        return None
    return architecture_signature(built)


def _checkpoint_run_problem(args: argparse.Namespace) -> Optional[str]:
    """validate.py ``--checkpoint`` of a train.py run, with a model whose weights are not the run's (architecture,
    classes, model kwargs that change shapes, module types or heads): the load fails with torch's list of
    mismatched tensors, or loads into another computation. Compared as built, so options that change no weight
    (drop rates, routing) and equal ways of saying one thing pass."""
    checkpoint = getattr(args, 'checkpoint', None)
    run = _run_args(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None
    if not run or not isinstance(run.get('model'), str) or not isinstance(run.get('model_kwargs') or {}, dict):
        return None
    wanted = _built_signature(run['model'], run.get('num_classes'), run.get('model_kwargs'))
    given = _built_signature(args.model, args.num_classes, getattr(args, 'model_kwargs', None))
    if wanted is None or given is None or wanted == given:
        return None
    flags = [f"--model {run['model']}"] + ([f"--num-classes {run['num_classes']}"] if run.get('num_classes') else [])
    if run.get('model_kwargs'):
        flags.append('--model-kwargs ' + ' '.join(shlex.quote(f'{k}={v}') for k, v in run['model_kwargs'].items()))
    return (f"--checkpoint {checkpoint} comes from a run of another model (its args.yaml): validate it with "
            f"{' '.join(flags)}.")


def _class_folders(root: Optional[str]) -> str:
    """' (DATA/train holds N class folders)', or '' where that cannot be said."""
    train = os.path.join(root, 'train') if root else ''
    if not os.path.isdir(train):
        return ''
    return f' ({train} holds {sum(e.is_dir() for e in os.scandir(train))} class folders)'


def _size_problem(args: argparse.Namespace, model: str, model_kwargs: dict, cfg) -> Optional[str]:
    """``--img-size`` / ``--input-size`` other than the size a fixed-size model is built for (a strict patch
    embedding: its default, or ``--model-kwargs img_size``). The scripts build the model at its size and size the
    images from these options, resampling neither, so the first batch fails inside the script."""
    input_size, img_size = getattr(args, 'input_size', None), getattr(args, 'img_size', None)
    if cfg is None or not cfg.fixed_input_size or (input_size is None and img_size is None):
        return None
    embed = getattr(timm.create_model(model, device='meta', **model_kwargs), 'patch_embed', None)
    if not getattr(embed, 'strict_img_size', False) or getattr(embed, 'img_size', None) is None:
        return None  # dynamic_img_size=True, or a model that takes other sizes
    height, width = embed.img_size
    size = tuple(input_size[-2:]) if input_size is not None else (img_size, img_size)
    if size == (height, width):
        return None
    given = f"--input-size {' '.join(map(str, input_size))}" if input_size is not None else f'--img-size {img_size}'
    fix = f'--img-size {height}' if input_size is None and height == width else \
        f'--input-size {input_size[0] if input_size else 3} {height} {width}'
    built = f'--model-kwargs img_size={model_kwargs["img_size"]}' if 'img_size' in model_kwargs else 'its default'
    wanted = size[0] if size[0] == size[1] else f'({size[0]},{size[1]})'
    return (f'{given} sizes the images {size[0]}x{size[1]}, but {model} is built for {height}x{width} ({built}) and '
            f'takes no other size: pass {fix}, or build it for the images with --model-kwargs img_size={wanted}.')


def _split_folder(root: str, split: str) -> Optional[str]:
    """The folder timm reads ``split`` from in ``root``, or None where it reads all of ``root``: timm reads a split
    from ``DATA/<split>`` (or a synonym, e.g. ``val/``) and, where there is none, from all of DATA."""
    from timm.data.dataset_factory import _search_split  # the lookup create_dataset makes for an image folder

    folder = _search_split(root, split)
    return folder if folder != root and os.path.isdir(folder) else None


def _holds_classes(folder: str) -> bool:
    """Whether ``folder`` holds class folders (hidden ones, e.g. '.ipynb_checkpoints', are none)."""
    return any(e.is_dir() and not e.name.startswith('.') for e in os.scandir(folder))


# the splits a folder may hold, those to score first (the suggestion for a missing validation split)
_SPLIT_NAMES = ('validation', 'val', 'test', 'train', 'training')


def _reads_folder(dataset: Optional[str]) -> bool:
    """Whether timm's ``create_dataset`` reads ``dataset`` from DATA (its split folders where it is a folder): no
    --dataset, a reader name without a prefix (``folder``), or torchvision's image folder; not a named dataset such
    as ``torch/cifar10``, ``hfds/...`` or ``wds/...``."""
    name = (dataset or '').lower()
    return '/' not in name or name in ('torch/folder', 'torch/image_folder')


def _split_problem(args: argparse.Namespace, root: str, training: bool) -> Optional[str]:
    """A split the script reads that ``root`` has no folder for, beside one it has: read from all of DATA, the other
    split's images would silently be trained on, validated on or scored (a data export with one ``--split``), and
    for train.py a DATA that is itself one split of a sorted tree (read as both splits). Other folders without split
    folders are timm's usual flat layout, left alone."""
    if not _reads_folder(getattr(args, 'dataset', '')) or not os.path.isdir(root):
        return None  # a named dataset reads its own splits
    splits = [getattr(args, 'train_split', None), getattr(args, 'val_split', None)] if training else \
        [getattr(args, 'split', None)]
    for split in filter(None, splits):  # a class named like a split (VOC's 'train') is read as that split
        folder = _split_folder(root, split)
        if folder and not _holds_classes(folder):
            if any(_holds_classes(e.path) for e in os.scandir(root) if e.is_dir() and e.path != folder):
                return (f"{folder}, the {split} split, holds no class folders: sort its images into class folders "
                        f"(timm labels an image by its folder), as in the other split.")
            return (f"{folder} holds images, not class folders, yet timm reads it as the {split} split: rename that "
                    f"class folder, or put the class folders under train/ and validation/.")
    # the split folders of class folders root holds (not a class named like a split), those to score first
    sorted_splits = {s: f for s in _SPLIT_NAMES if (f := _split_folder(root, s)) and _holds_classes(f)}
    if not training:  # validate.py: one --split
        split = getattr(args, 'split', None)
        found = [s for s in sorted_splits if s != split]
        if not split or _split_folder(root, split) or not found:
            return None
        return (f"{root} has no {split}/ folder, so validate.py would score all of it, the "
                f"{os.path.basename(sorted_splits[found[0]])}/ images included: pass the split to score with "
                f"--split (e.g. --split {found[0]}), or add the {split} split.")
    train_split, val_split = getattr(args, 'train_split', None), getattr(args, 'val_split', None)
    if not (train_split and val_split):
        return None  # no validation (--val-split '')
    train_root, val_root = _split_folder(root, train_split), _split_folder(root, val_split)
    if train_root and not val_root:
        held_out = next((s for s in _SPLIT_NAMES[:3] if s in sorted_splits), None)  # e.g. test/
        other = f' (--val-split {held_out} validates on {os.path.basename(sorted_splits[held_out])}/)' \
            if held_out else ''
        return (f"{root} has no {val_split}/ folder, so train.py would validate on all of it, the "
                f"{os.path.basename(train_root)}/ images included: pass --val-split '' to train without validation"
                f"{other}, or add the validation split.")
    if val_root and not train_root:
        return (f"{root} has no {train_split}/ folder, so train.py would train on all of it, the "
                f"{os.path.basename(val_root)}/ images included: add the training split, or name its folder with "
                f"--train-split.")
    # DATA pointed at one split of a sorted tree (export/train): train.py would validate on its training images
    parent, name = os.path.split(os.path.abspath(root))
    if not train_root and not val_root and name in _SPLIT_NAMES and any(
            (f := _split_folder(parent, s)) and os.path.basename(f) != name and _holds_classes(f)
            for s in _SPLIT_NAMES):
        return (f"{root} is the {name} split of {parent}, so train.py would read it as both splits and validate on "
                f"the images it trains on: pass {parent} as DATA.")
    return None


def _step_in_backward_problem(args: argparse.Namespace) -> Optional[str]:
    """What train.py would do between backward and the optimizer step, which ``step_in_backward=True`` (the
    parameters updated, their gradients freed, during backward) cannot take part in."""
    value = args.opt_kwargs['step_in_backward']
    if not str(args.opt).lower().endswith('adafactorlean'):
        return f'step_in_backward is an option of --opt adafactorlean, not of --opt {args.opt}.'
    if not isinstance(value, bool):
        return f'--opt-kwargs step_in_backward={value}: give True or False.'
    if not value:
        return None
    why = ' needs the gradients after backward, where step_in_backward=True has already used and freed them'
    if args.clip_grad is not None:
        return (f'--clip-grad {args.clip_grad} (given, or clip_grad in --config)' + why + ': drop it or '
                'step_in_backward.')
    if getattr(args, 'grad_accum_steps', 1) > 1:
        return f'--grad-accum-steps {args.grad_accum_steps}' + why + ': drop it or step_in_backward.'
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        return 'DDP (torchrun with more than one process)' + why + ' (its all-reduce runs later): use one process.'
    if args.amp and args.amp_dtype == 'float16' and not str(args.device).startswith('cpu'):
        return 'float16 AMP scales the loss and' + why + ': use --amp-dtype bfloat16.'
    if getattr(args, 'model_dtype', None) not in (None, 'float32'):
        return (f'--model-dtype {args.model_dtype}: step_in_backward=True updates float32 weights; use --amp '
                '--amp-dtype bfloat16 for bf16 compute.')
    return None


@dataclass
class _Run:
    """What a script run is asked for, as the argument checks read it."""
    args: argparse.Namespace
    training: bool  # train.py (validate.py's arguments have no optimizer)
    model: Optional[str]
    cfg: Any  # the model's default pretrained cfg, None where there is none
    root: Optional[str]  # the image folder the script reads: train.py prefers --data-dir, validate.py DATA


def _data_problem(run: _Run) -> Optional[str]:
    """An image folder that is not there (found only after the model is built, which may mean recycling it), or a
    train.py folder with one of its two splits (silently read as both)."""
    if run.root and _reads_folder(getattr(run.args, 'dataset', '')) and not os.path.exists(run.root):
        return (f"data folder '{run.root}' does not exist: pass the folder that holds your images (train/ and "
                f"validation/).")
    return _split_problem(run.args, run.root, run.training) if run.root else None


def _img_size_problem(run: _Run) -> Optional[str]:
    """``--model-kwargs img_size=N`` without ``--img-size N``: the scripts size their data from --img-size, else
    the default cfg's, not from the model (it fails after the first batch)."""
    size = (getattr(run.args, 'model_kwargs', None) or {}).get('img_size')
    default_size = run.cfg.input_size[-1] if run.cfg is not None and run.cfg.input_size else None
    if (size is not None and getattr(run.args, 'img_size', None) is None
            and getattr(run.args, 'input_size', None) is None and size != default_size):
        return (f'--model-kwargs img_size={size} changes the model but not the data pipeline: add --img-size {size} '
                f'(train.py and validate.py size the images from it).')
    return None


def _model_problem(run: _Run) -> Optional[str]:
    """An unknown model or model kwarg, a kwarg the script sets itself, or an --img-size / --input-size that a
    fixed-size model is not built for."""
    model, args = run.model, run.args
    # 'hf-hub:' / 'local-dir:' models are timm's to resolve; validate.py also takes 'all', wildcards and a file of names
    # (and models registered by train.py's --device-modules, imported only inside it)
    if not model or ':' in model or not _one_model(model) or getattr(args, 'device_modules', None):
        return None
    arch = model.partition('.')[0]
    if not timm.is_model(arch):
        return (f"Unknown model '{arch}'{did_you_mean(arch, timm.list_models())}: pass a timm model name "
                f"(jetmoe_timm adds {', '.join(list_jetmoe_models())}).")
    model_kwargs = getattr(args, 'model_kwargs', None) or {}
    script_args = dict(_SCRIPT_MODEL_ARGS, **(_TRAIN_MODEL_ARGS if run.training else {}))
    for key in model_kwargs:
        if key in script_args:
            return (f'--model-kwargs {key}={model_kwargs[key]}: the script passes {key} itself; use '
                    f'{script_args[key]} instead.')
    try:
        check_model_kwargs(model, model_kwargs)
    except ValueError as e:
        return str(e)
    return _size_problem(args, model, model_kwargs, run.cfg)


def _optimizer_problem(run: _Run) -> Optional[str]:
    """An unknown optimizer, or ``step_in_backward`` with what it cannot take part in (silently wrong)."""
    # train.py: timm's factory reads 'lookahead_NAME' and the part after the last '_'
    opt = getattr(run.args, 'opt', None)
    if isinstance(opt, str) and opt.lower().split('_')[-1] not in timm.optim.list_optimizers():
        return (f"Unknown optimizer '{opt}'{did_you_mean(opt.lower(), timm.optim.list_optimizers())}: pass a name "
                "from timm.optim.list_optimizers() (the memory-lean one for JetMoE models: adafactorlean).")
    if 'step_in_backward' in (getattr(run.args, 'opt_kwargs', None) or {}):
        return _step_in_backward_problem(run.args)
    return None


def _checkpoint_file_problem(run: _Run) -> Optional[str]:
    """A checkpoint file that is not there, a folder, or a damaged .safetensors."""
    for name in _FILE_ARGS:
        path = getattr(run.args, name, None)
        if path and not os.path.exists(path):
            return f"--{name.replace('_', '-')} {path} does not exist: pass an existing checkpoint file."
        if path and name != 'checkpoint' and os.path.isdir(path):  # validate.py's --checkpoint DIR: its bulk mode
            return (f"--{name.replace('_', '-')} {path} is a folder: pass the checkpoint file in it (train.py writes "
                    f"last.pth.tar and model_best.pth.tar).")
        if path and str(path).endswith('.safetensors') and os.path.isfile(path):
            try:  # the header and the size only: a truncated file is otherwise a traceback from safetensors' loader
                verify_safetensors(path, content=False)
            except ValueError as e:
                return f"--{name.replace('_', '-')} {e}: pass an undamaged checkpoint file."
    return None


def _environment_problem(run: _Run) -> Optional[str]:
    """train.py's allocator variable set to what it does not know, or the scripts' default ``--device cuda``
    where torch sees no GPU."""
    allocator = os.environ.get(ALLOCATOR_ENV) if run.training else None  # train.py's; empty: unset
    if allocator and allocator.lower() not in _ALLOCATOR_OFF:
        return (f'{ALLOCATOR_ENV}={allocator}: set it to default (or off) to leave glibc\'s malloc as it is, or unset '
                'it (CPU training keeps freed memory).')
    device = str(getattr(run.args, 'device', None) or '')
    if device.startswith('cuda') and not torch.cuda.is_available():
        return f'--device {device} (timm\'s default is cuda) needs a GPU, and torch sees none here: add --device cpu.'
    return None


def _weights_problem(run: _Run) -> Optional[str]:
    """A 'local-dir:' folder that is no model folder, validate.py's checkpoint of another model's run, or no
    --num-classes for a model without a classifier (the recycled tags and folders converted from them)."""
    config, problem = _local_dir_config(run.model)
    problem = problem or (None if run.training else _checkpoint_run_problem(run.args))
    if problem:
        return problem
    if getattr(run.args, 'num_classes', None) is None and _default_classes(run.cfg, config) == 0:
        if run.training:
            return (f"--num-classes is needed: {run.model}'s default weights have no classifier (num_classes=0), so "
                    f"without it the model trains its features as logits{_class_folders(run.root)}.")
        return (f"--num-classes is needed: {run.model} has no classifier by default (num_classes=0), so without it "
                f"the features are scored as logits: validate a fine-tuned checkpoint (--checkpoint) with the classes "
                f"it was trained for.")
    return None


# what would fail late in the scripts (after the model is built, the first batch, or the whole evaluation, most
# as a traceback from inside them), checked before anything runs, in this order
_ARGUMENT_CHECKS = (_data_problem, _img_size_problem, _model_problem, _optimizer_problem, _checkpoint_file_problem,
                    lambda run: _output_problem(run.args, run.training), _environment_problem, _weights_problem)


def _argument_problem(args: Optional[argparse.Namespace], script: str = '') -> Optional[str]:
    """The first of ``_ARGUMENT_CHECKS``' answers for a run of ``script`` with ``args``, None if all pass."""
    if args is None:
        return None
    training = script == 'train.py' or hasattr(args, 'opt')  # validate.py's arguments have no optimizer
    data, data_dir = getattr(args, 'data', None), getattr(args, 'data_dir', None)
    run = _Run(args, training, getattr(args, 'model', None), _default_cfg(getattr(args, 'model', None)),
               (data_dir or data) if training else (data or data_dir))
    return next((problem for check in _ARGUMENT_CHECKS if (problem := check(run))), None)


def _output_problem(args: argparse.Namespace, training: bool) -> Optional[str]:
    """Where the script would write, checked now: train.py creates its --output folder (default ./output/train) only
    once the model and optimizer are built, validate.py writes --results-file after the whole evaluation."""
    try:
        if training:
            check_output_folder(getattr(args, 'output', '') or './output/train', overwrite=True, flag='--output')
            return None
        results = getattr(args, 'results_file', '')
        if results and os.path.isdir(results):
            return f'--results-file {results} is a folder: give a file path (validate.py writes a table to it).'
        if results:
            check_output_folder(os.path.dirname(os.path.abspath(results)), overwrite=True,
                                flag=f'--results-file {results}: its folder')
    except ValueError as e:
        return str(e)
    return None


def _preprocessing_note(args: Optional[argparse.Namespace]) -> Optional[str]:
    """validate.py ``--checkpoint`` builds the model without pretrained weights, so it normalises with the model's
    default mean / std; a fine-tune that started from pretrained (recycled) weights was trained with theirs, which
    train.py resolved and logged but did not record (its args.yaml keeps ``mean: null``)."""
    checkpoint = getattr(args, 'checkpoint', '') if args is not None else ''
    if not checkpoint or args.mean is not None or args.std is not None or getattr(args, 'pretrained', False):
        return None
    run = _run_args(checkpoint)
    if not run or not (run.get('pretrained') or run.get('pretrained_path')) or run.get('mean') is not None:
        return None
    used = _recorded_mean_std(run.get('pretrained_path'))
    if used is not None:  # a recycled file says what it was normalised with: a note only where that differs
        try:  # the cfg validate.py takes its mean / std from
            default = timm.models.get_pretrained_cfg(args.model)
        except Exception:  # an unknown tag: validate.py says so
            default = None
        if default is not None and (tuple(default.mean), tuple(default.std)) == used:
            return None
        mean, std = (' '.join(f'{v:g}' for v in values) for values in used)
        return (f"note: this checkpoint's run started from weights normalised with mean {mean} and std {std} (its "
                f"--pretrained-path); validate.py uses the model's default: pass --mean {mean} --std {std}.")
    return ("note: this checkpoint's run started from pretrained weights, whose preprocessing train.py used (its log, "
            "'Data processing configuration'); validate.py uses the model's default unless you pass the same --mean "
            "and --std.")


def _recorded_mean_std(path: Optional[str]) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """(mean, std) that a recycled safetensors file records for its weights (their predecessor's), None where the
    file records none or cannot be read."""
    if not path or not str(path).endswith('.safetensors'):
        return None
    contract = recorded_input_contract(path)
    if not (isinstance(contract.get('mean'), tuple) and isinstance(contract.get('std'), tuple)):
        return None
    return contract['mean'], contract['std']


# the scripts' calls that read what the user named (a model, its pretrained weights, a checkpoint): (module, name)
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


def _one_model(model: Optional[str]) -> bool:
    """Whether validate.py's --model names one model (not 'all', a wildcard or a file of names)."""
    return bool(model) and model != 'all' and not any(c in model for c in '*?[') and not os.path.isfile(model)


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
    problem = _config_problem(argv) if script == 'train.py' else None
    args, refused = (None, None) if problem else _parse_script_args(path, argv)
    if refused:
        print(f'{prog}: error: {refused} (see {prog} --help)', file=sys.stderr)
        return 2
    problem = problem or _argument_problem(args, script)
    if problem:
        print(f'{prog}: error: {problem}', file=sys.stderr)
        return 2
    note = _preprocessing_note(args) if script == 'validate.py' else None
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
    one = _one_model(getattr(args, 'model', None)) and not os.path.isdir(getattr(args, 'checkpoint', None) or '')
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
