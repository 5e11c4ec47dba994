#!/usr/bin/env python
"""Speed benchmark, the same as ``jetmoe-timm bench`` (see docs/benchmark.md).

    python scripts/bench.py --quick                 # about 2 minutes
    THP_MEM_ALLOC_ENABLE=1 python scripts/bench.py  # the full table (long on a small CPU)
"""
import sys

from jetmoe_timm.tools.bench import main

if __name__ == '__main__':
    sys.exit(main())
