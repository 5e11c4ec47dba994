""" Write a timm model as a Hub-style folder: ``model.safetensors`` + timm ``config.json``.

The folder loads with ``timm.create_model('local-dir:DIR', pretrained=True)`` (after ``import jetmoe_timm``),
and ``jetmoe-timm push`` uploads it. Provenance (how the weights were made) goes into the safetensors metadata
and into ``config.json`` under ``"jetmoe"``; it is also summarised in ``pretrained_cfg.description``.
Folders are written next to their destination and renamed into place, so a crash never leaves half a folder.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import safetensors.torch
import torch
import torch.nn as nn
from timm.models import save_for_hf

__all__ = ['save_pretrained_folder', 'save_safetensors_atomic', 'read_provenance']

PROVENANCE_KEY = 'jetmoe'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _contiguous_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors rejects views and shared storage
    return {k: v.detach().contiguous().clone() for k, v in state_dict.items()}


def save_safetensors_atomic(state_dict: Dict[str, torch.Tensor], path: os.PathLike,
                            provenance: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``state_dict`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {PROVENANCE_KEY: json.dumps(provenance or {}, sort_keys=True)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        safetensors.torch.save_file(_contiguous_state_dict(state_dict), tmp, metadata=metadata)
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


def _describe(provenance: Dict[str, Any]) -> str:
    if not provenance:
        return ''
    keys = ('predecessor', 'recipe', 'method', 'statistic', 'calibration', 'seed')
    parts = [f'{k}={provenance[k]}' for k in keys if k in provenance]
    return 'Recycled with jetmoe_timm (' + ', '.join(parts) + ')'


def save_pretrained_folder(
        model: nn.Module,
        out_dir: os.PathLike,
        provenance: Optional[Dict[str, Any]] = None,
        overwrite: bool = False,
) -> Path:
    """Write ``model`` as ``out_dir/{model.safetensors, config.json}`` atomically; returns ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f'{out_dir} already exists: choose another --out or pass overwrite=True (--overwrite).')
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    provenance = dict(provenance or {})
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f'.{out_dir.name}.'))
    try:
        model_config = {}
        if provenance:
            model_config['pretrained_cfg'] = dict(description=_describe(provenance))
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True)
        # re-write the weights with provenance metadata
        save_safetensors_atomic(model.state_dict(), tmp / 'model.safetensors', provenance)
        config_path = tmp / 'config.json'
        config = json.loads(config_path.read_text())
        # the (large) index selection stays in the weights' metadata only
        config[PROVENANCE_KEY] = {k: v for k, v in provenance.items() if k != 'selection'}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=False) + '\n')
        os.chmod(tmp, 0o777 & ~_umask())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
