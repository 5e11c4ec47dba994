""" Evaluate a jetmoe_timm model with timm's own ``validate.py``.

    python -m jetmoe_timm.validate [--timm-scripts DIR] DATA --model v_jetmoe_tiny --checkpoint CKPT [...]

timm's ``validate.py`` has no option to import a plugin, so ``validate.py --model v_jetmoe_tiny`` alone fails with
"Unknown model". This launcher imports jetmoe_timm first, then runs ``validate.py`` from a timm checkout
(``--timm-scripts DIR`` or ``$JETMOE_TIMM_SCRIPTS``) as ``__main__`` with all other arguments unchanged.
"""
import sys
from typing import List, Optional

from .tools._scripts import run_timm_script


def main(argv: Optional[List[str]] = None) -> int:
    return run_timm_script('validate.py', argv, prog='jetmoe-timm-validate')


if __name__ == '__main__':
    sys.exit(main())
