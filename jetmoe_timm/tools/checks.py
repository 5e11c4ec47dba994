""" Checks every command makes before expensive work: outputs it can write, model kwargs that build (and the
parsing of those kwargs from their ``K=V`` words). """
import ast
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import timm
import torch

from .._names import closest_name
from ..atomic import replace_problem
from ..models import check_model_name

__all__ = ['check_device', 'check_model_kwargs', 'check_model_name', 'check_output_folder', 'parse_model_kwargs']


def check_output_folder(out: os.PathLike, overwrite: bool, flag: str = '--out',
                        owned: Optional[Callable[[Path], bool]] = None, what: str = '',
                        overwrite_flag: Optional[str] = None) -> Path:
    """Fail now, before any expensive work, when ``out`` cannot be written as a folder.

    With ``owned``, ``overwrite`` means replacing the folder: refused when that could delete what the command did
    not write there (``owned`` recognises an earlier output, ``what`` names it). Without ``overwrite``, a folder
    that holds files is refused naming ``overwrite_flag`` (the command's own option, e.g. '--overwrite'); without
    that either, it is left to the command."""
    if not str(out):  # Path('') is the current folder
        raise ValueError(f'{flag} is empty: give a folder path.')
    out = Path(out)
    if os.path.islink(out) and not out.exists():
        raise ValueError(f'{flag} {out} is a link to nothing ({os.readlink(out)}): remove it or choose another path.')
    if out.exists() and not out.is_dir():
        raise ValueError(f'{flag} {out} is a file: give a folder path.')
    replacing = out.exists() and overwrite and owned is not None
    if replacing:
        problem = replace_problem(out, owned, what)
        if problem:
            raise ValueError(f'{flag} {out} {problem}: choose another {flag}.')
    if out.exists() and not overwrite and any(out.iterdir()) and overwrite_flag:
        raise ValueError(f'{flag} {out} already exists: choose another {flag} or pass {overwrite_flag}.')
    target = Path(os.path.abspath(out))
    # a replacement, or the filling of a folder that exists, is made beside it and renamed into place
    target = target.parent if replacing or (out.exists() and owned is not None) else target
    parent = next(p for p in (target, *target.parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f'{flag} {out}: {parent} is a file, not a folder; choose another path.')
    try:  # a real write: os.access says yes to root on read-only or special filesystems (/sys, a read-only mount)
        fd, probe = tempfile.mkstemp(dir=parent, prefix='.jetmoe-write-check.')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f'{flag} {out}: {parent} is not writable ({e.strerror}); choose a folder you can write '
                         f'to.') from None
    return out


def check_device(name: str) -> torch.device:
    """``--device NAME`` as torch reads it, refused now where it names no device or a GPU torch does not see (torch
    would say so only when the model is moved, after building it)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: unknown device; use cpu, cuda or cuda:N.") from None
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'--device {name}: torch sees no CUDA GPU here; run on a machine with one, or drop '
                             f'--device to run on the CPU.')
        if (dev.index or 0) >= count:
            raise ValueError(f'--device {name}: torch sees {count} GPU(s), numbered from 0.')
    return dev


def parse_model_kwargs(items) -> Dict[str, Any]:
    """``k=v`` strings -> dict, values parsed as Python literals (as timm's train.py does)."""
    out, last = {}, None
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep:
            if last is not None and isinstance(out[last], str) and out[last][:1] in ('[', '('):  # the shell split it
                raise ValueError(f"model kwarg '{last}={out[last]} {item}' has a space, which the shell splits: write "
                                 f"it without spaces ({last}={out[last]}{item}) or quote it")
            raise ValueError(f"model kwarg '{item}' is not of the form key=value")
        last = key
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def check_model_kwargs(model: str, kwargs: Dict[str, Any], flag: str = '--model-kwargs') -> None:
    """Build ``model`` with ``kwargs`` on the meta device now: a typo or a wrong type is named, with a
    "did you mean", before any expensive work; ``flag`` is the option that gave them."""
    if not kwargs:
        return
    arch = check_model_name(model)
    dropped = [k for k, v in kwargs.items() if v is None]
    if dropped:  # e.g. ls_init_value=None, meant to build without layer scale, would build it with
        raise ValueError(f"{flag} {dropped[0]}=None: timm's create_model drops arguments set to None, so the model "
                         f"would keep its default {dropped[0]}; leave it out, or give a value.")
    try:
        timm.create_model(arch, device='meta', **kwargs)
    except TypeError as e:
        params = {name: p for cls in reversed(type(timm.create_model(arch, device='meta')).__mro__)
                  for name, p in inspect.signature(cls.__init__).parameters.items()}
        bad = next((k for k in kwargs if f"'{k}'" in str(e)), None)
        if bad is None:
            # a word where the model takes a number (ParseKwargs keeps what is no Python literal as a string), or a
            # fraction where it takes a count
            def wrong(k, v):  # a tuple where the default is one number may be right (img_size=(64, 64))
                d = params[k].default if k in params else None
                return isinstance(d, (int, float)) and not isinstance(d, bool) and (
                    isinstance(v, str) or isinstance(v, float) and isinstance(d, int))
            numbers = [k for k, v in kwargs.items() if wrong(k, v)]
            if numbers:
                k = numbers[0]
                kind = 'a whole number' if isinstance(params[k].default, int) else 'a number'
                raise ValueError(f'{flag} {k}={kwargs[k]}: {arch} takes {kind} for {k}.') from None
            raise ValueError(f'{flag} {_kv(kwargs)}: a value has the wrong type ({e}).') from None
        known = set(params) - {'self', 'args', 'kwargs'}
        close = closest_name(bad, sorted(known))
        raise ValueError(f"{flag}: {arch} takes no argument '{bad}'"
                         + (f"; did you mean '{close}'?" if close else '.')) from None
    except (ValueError, AssertionError) as e:
        raise ValueError(f"{flag} {_kv(kwargs)} do not make a {arch}: {str(e).rstrip('.') or type(e).__name__}."
                         ) from None


def _kv(kwargs: Dict[str, Any]) -> str:
    return ' '.join(f'{k}={v}' for k, v in kwargs.items())

