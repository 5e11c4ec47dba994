""" Write a timm model as a Hub-style folder: ``model.safetensors`` + timm ``config.json``.

The folder loads with ``timm.create_model('local-dir:DIR', pretrained=True)`` (after ``import jetmoe_timm``),
and ``jetmoe-timm push`` uploads it. Provenance (how the weights were made) goes into the safetensors metadata
and into ``config.json`` under ``"jetmoe"``; it is also summarised in ``pretrained_cfg.description``.
Folders are written next to their destination and renamed into place, so a crash never leaves half a folder.

Every safetensors file written here also carries a content checksum (``jetmoe_sha256`` in its metadata: sha256
over each tensor's name, dtype, shape and bytes, in name order); ``verify_safetensors`` recomputes it, so a
truncated file or flipped bytes are caught before anything is loaded.
"""
import collections
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import safetensors.torch
import torch
import torch.nn as nn
from timm.models._hub import save_config_for_hf

__all__ = ['public_source', 'save_pretrained_folder', 'save_safetensors_atomic', 'read_provenance', 'verify_safetensors',
           'is_model_folder', 'replace_problem', 'replace_folder']

PROVENANCE_KEY = 'jetmoe'
CHECKSUM_KEY = 'jetmoe_sha256'

# dtype names of the safetensors format, as they appear in a file's header
_SAFETENSORS_DTYPES = {
    torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
    torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
    torch.bool: 'BOOL', torch.float8_e4m3fn: 'F8_E4M3', torch.float8_e5m2: 'F8_E5M2',
}
_READ_CHUNK = 16 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contiguous_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tensors safetensors accepts: each dense, contiguous and alone in its storage. Only those that are not get
    copied, so a full-size model is not held twice while it is written (v_jetmoe_small: 4 GB)."""
    # counted on the caller's tensors: .cpu() of a GPU tensor makes a new storage, alone by construction
    sharing = collections.Counter(v.untyped_storage().data_ptr() for v in state_dict.values())
    out = {}
    for k, v in state_dict.items():
        shared = sharing[v.untyped_storage().data_ptr()] > 1
        v = v.detach().cpu()
        whole = (v.is_contiguous() and v.storage_offset() == 0
                 and v.untyped_storage().nbytes() == v.numel() * v.element_size())
        out[k] = v if whole and not shared else v.clone(memory_format=torch.contiguous_format)
    return out


def _entry_bytes(name: str, dtype: str, shape) -> bytes:
    return json.dumps([name, dtype, list(shape)]).encode()


def _state_dict_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """The content checksum of ``tensors`` as they will be stored (see ``verify_safetensors``)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(_entry_bytes(name, _SAFETENSORS_DTYPES[t.dtype], t.shape))
        # safetensors stores the little-endian bytes of a contiguous tensor, which is what a CPU tensor holds
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path: os.PathLike,
                            provenance: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``state_dict`` to ``path`` (with provenance and a content checksum) via a temporary file and an
    atomic rename: readers see the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _contiguous_state_dict(state_dict)
    metadata = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True),
                CHECKSUM_KEY: _state_dict_digest(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_provenance(path: os.PathLike) -> Dict[str, Any]:
    """The provenance dict stored in a safetensors file's metadata ({} if none)."""
    with safetensors.safe_open(str(path), framework='pt') as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(PROVENANCE_KEY, '{}'))


def verify_safetensors(path: os.PathLike, require_checksum: bool = False) -> Dict[str, str]:
    """Check that ``path`` is a complete safetensors file whose tensors match its content checksum.

    Reads the whole file (about 0.5 s per GB). Files without a checksum (not written by jetmoe_timm) only get the
    structural checks, unless ``require_checksum``. Returns the file's metadata; raises ``ValueError`` naming
    what is wrong (truncated, header damaged, checksum mismatch).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        n = int.from_bytes(f.read(8), 'little') if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f'{path} is not a complete safetensors file ({size} bytes; truncated or not safetensors)')
        try:
            header = json.loads(f.read(n))
            metadata = header.pop('__metadata__', None) or {}
            entries = {k: (v['dtype'], v['shape'], *v['data_offsets']) for k, v in header.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f'{path} has a damaged safetensors header ({type(e).__name__}: {e})') from e
        expected = 8 + n + max((e[3] for e in entries.values()), default=0)
        if size != expected:
            raise ValueError(f'{path} is {size} bytes but its header describes {expected}: '
                             f'{"truncated" if size < expected else "trailing data"}')
        checksum = metadata.get(CHECKSUM_KEY)
        if checksum is None:
            if require_checksum:
                raise ValueError(f'{path} has no content checksum ({CHECKSUM_KEY}): it was not written by '
                                 f'jetmoe_timm.export')
            return metadata
        h = hashlib.sha256()
        buf = memoryview(bytearray(_READ_CHUNK))
        for name in sorted(entries):
            dtype, shape, start, end = entries[name]
            h.update(_entry_bytes(name, dtype, shape))
            f.seek(8 + n + start)
            left = end - start
            while left > 0:
                got = f.readinto(buf[:min(left, _READ_CHUNK)])
                if not got:
                    raise ValueError(f'{path} ended while reading {name}')
                h.update(buf[:got])
                left -= got
    if h.hexdigest() != checksum:
        raise ValueError(f'{path} does not match its content checksum: its tensor data or header is corrupted')
    return metadata


def public_source(spec: Optional[str]) -> Optional[str]:
    """A predecessor spec as it may be published: timm and ``hf-hub:`` names as they are, a local folder or file
    only by its name (``local checkpoint 'name'``), never its path."""
    if not spec:
        return spec
    local = spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec
    if spec.startswith('local-dir:') or os.sep in local or local.endswith(('.safetensors', '.pth', '.bin', '.pt')):
        return f"local checkpoint '{Path(local.rstrip(os.sep)).name}'"
    return spec


def _describe(provenance: Dict[str, Any]) -> str:
    if not provenance:
        return ''
    if provenance.get('source') == 'official':
        return (f"Converted from the official MoE Jetpack checkpoint {provenance.get('file', '')} "
                f"(sha256 {str(provenance.get('sha256', ''))[:12]})")
    keys = ('predecessor', 'recipe', 'method', 'statistic', 'calibration', 'seed')
    parts = [f'{k}={public_source(provenance[k]) if k == "predecessor" else provenance[k]}' for k in keys
             if k in provenance]
    return 'Recycled with jetmoe_timm (' + ', '.join(parts) + ')'


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` holds a model folder as written here (or by timm's ``save_for_hf``) and nothing else."""
    names = {p.name for p in path.iterdir()}
    return 'config.json' in names and names <= {'model.safetensors', 'config.json', 'README.md'}


def replace_problem(dst: os.PathLike, owned: Callable[[Path], bool], what: str) -> Optional[str]:
    """Why replacing the existing folder ``dst`` could lose something the caller did not write, or None.

    Only an empty folder or one that ``owned`` recognises (an earlier output of the same kind, ``what``) may be
    replaced; never the current folder or one that holds it (``--out .``)."""
    dst = Path(dst)
    if not dst.is_dir():
        return None
    here = Path.cwd().resolve()
    if dst.resolve() == here or dst.resolve() in here.parents:
        return 'is the current folder or holds it'
    if any(dst.iterdir()) and not owned(dst):
        names = sorted(p.name for p in dst.iterdir())
        listed = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
        return f'holds files that are not {what} ({listed}); only an earlier output folder is replaced'
    return None


def replace_folder(new: Path, dst: Path) -> None:
    """Rename the finished folder ``new`` to ``dst``. An existing ``dst`` is moved aside first and deleted only
    once ``new`` is in place; if the rename fails, it is moved back."""
    if not dst.exists():
        os.replace(new, dst)
        return
    aside = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f'.{dst.name}.', suffix='.old'))
    os.replace(dst, aside / dst.name)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(aside / dst.name, dst)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_pretrained_folder(
        model: nn.Module,
        out_dir: os.PathLike,
        provenance: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``model`` as ``out_dir/{model.safetensors, config.json}`` atomically; returns ``out_dir``.

    ``overwrite`` replaces an existing model folder (see ``replace_problem``), never other files."""
    out_dir = Path(os.path.abspath(out_dir))  # '.' and '..' have no usable parent
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f'{out_dir} already exists: choose another --out or pass overwrite=True (--overwrite).')
    problem = replace_problem(out_dir, is_model_folder, 'a converted model')
    if problem:
        raise FileExistsError(f'{out_dir} {problem}: choose another --out.')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    provenance = dict(provenance or {})
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f'.{out_dir.name}.'))
    try:
        model_config = {}
        if provenance:
            model_config['pretrained_cfg'] = dict(description=_describe(provenance))
        # weights written once, with provenance; config.json is timm's own (architecture, model_args, cfg)
        save_safetensors_atomic(model.state_dict(), tmp / 'model.safetensors', provenance)
        config_path = tmp / 'config.json'
        save_config_for_hf(model, config_path, model_config=model_config)
        config = json.loads(config_path.read_text())
        # the (large) index selection stays in the weights' metadata only
        config[PROVENANCE_KEY] = {k: v for k, v in provenance.items() if k != 'selection'}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=False) + '\n')
        os.chmod(tmp, 0o777 & ~_umask())
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
