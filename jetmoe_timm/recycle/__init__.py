""" Checkpoint recycling: dense timm checkpoints become initial weights of JetMoE successors. """
from .build import RECYCLE_SOURCES, build_recycled, cached_recycled_file
from .predecessor import load_predecessor
from .folder import convert
from .engine import CALIB_SIZES, RECIPES, RecycleResult, recycle
from .selection import METHODS
from .stats import STATISTICS

__all__ = ['CALIB_SIZES', 'METHODS', 'RECIPES', 'RECYCLE_SOURCES', 'STATISTICS', 'RecycleResult', 'build_recycled',
           'cached_recycled_file', 'convert', 'load_predecessor', 'recycle']
