""" Recycle a predecessor into a JetMoE model and write it as a timm / Hub folder (``convert``). """
import os
from pathlib import Path
from typing import Any, Dict, Optional

from ..atomic import check_replaceable
from ..export import is_model_folder, save_pretrained_folder
from .build import build_recycled
from .engine import selection_to_json

__all__ = ['convert']


def convert(
        model_name: str,
        out_dir: os.PathLike,
        model_kwargs: Optional[Dict[str, Any]] = None,
        predecessor: Optional[str] = None,
        body_predecessor: Optional[str] = None,
        overwrite: bool = False,
        progress: bool = True,
        **options,
) -> Path:
    """Recycle weights for ``model_name`` and write ``out_dir`` (model.safetensors + config.json); returns its
    absolute path.

    The folder loads with ``timm.create_model('local-dir:OUT', pretrained=True)`` after ``import jetmoe_timm``.
    ``options``: method, recipe, statistic, calib, num_calib, batch_size, seed (see ``recycle``).
    """
    out_dir = Path(out_dir)
    # before the (long) recycling, not after
    check_replaceable(out_dir, overwrite, is_model_folder, 'a converted model', '--out')
    model, result = build_recycled(model_name, model_kwargs, predecessor=predecessor,
                                   body_predecessor=body_predecessor, progress=progress, **options)
    provenance = dict(result.provenance, selection=selection_to_json(result.selection))
    return save_pretrained_folder(model, out_dir, provenance, overwrite=overwrite)
