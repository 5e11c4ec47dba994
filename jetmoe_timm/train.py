""" Train a jetmoe_timm model with timm's own ``train.py``.

    python -m jetmoe_timm.train [--timm-scripts DIR] DATA --model v_jetmoe_tiny [any train.py option ...]
    torchrun --nproc_per_node=2 -m jetmoe_timm.train [--timm-scripts DIR] DATA --model v_jetmoe_tiny ...

Imports jetmoe_timm (registering its models), then runs ``train.py`` from a timm checkout (``--timm-scripts DIR``
or ``$JETMOE_TIMM_SCRIPTS``) as ``__main__`` with all other arguments unchanged. Without the launcher, the same is
``python DIR/train.py DATA --device-modules jetmoe_timm --model v_jetmoe_tiny ...``.
"""
import sys
from typing import List, Optional

from .tools._scripts import run_timm_script


def main(argv: Optional[List[str]] = None) -> int:
    return run_timm_script('train.py', argv, prog='jetmoe-timm-train')


if __name__ == '__main__':
    sys.exit(main())
