""" What a run of timm's ``train.py`` / ``validate.py`` is asked for, checked before it starts: each mistake that
the scripts would report late (after the model is built, the first batch, or the whole evaluation), most as a
traceback from inside them, is said here in one line with its fix (``argument_problem``).
"""
import argparse
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import timm
import torch

from .._names import did_you_mean
from ..export import read_model_config, verify_safetensors
from ..models import list_jetmoe_models
from ..models._pretrained import architecture_signature, recorded_input_contract
from .checks import check_model_kwargs, check_output_folder

__all__ = ['ALLOCATOR_ENV', 'ALLOCATOR_OFF', 'argument_problem', 'config_problem', 'one_model', 'preprocessing_note']


ALLOCATOR_ENV = 'JETMOE_TIMM_ALLOCATOR'
ALLOCATOR_OFF = ('default', 'off')  # its values (any case) that leave glibc's malloc as it is


def one_model(model: Optional[str]) -> bool:
    """Whether validate.py's --model names one model (not 'all', a wildcard or a file of names)."""
    return bool(model) and model != 'all' and not any(c in model for c in '*?[') and not os.path.isfile(model)


def config_problem(argv: List[str]) -> Optional[str]:
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
    if not model or ':' in model or not one_model(model) or getattr(args, 'device_modules', None):
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
    if allocator and allocator.lower() not in ALLOCATOR_OFF:
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


def argument_problem(args: Optional[argparse.Namespace], script: str = '') -> Optional[str]:
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


def preprocessing_note(args: Optional[argparse.Namespace]) -> Optional[str]:
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
