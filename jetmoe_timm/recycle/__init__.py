""" Checkpoint recycling: dense timm checkpoints become initial weights of JetMoE successors. """
from .engine import RECIPES, RecycleResult, recycle
from .selection import METHODS
from .stats import STATISTICS
