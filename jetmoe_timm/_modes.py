""" A model in eval mode for a block of code, then back in the mode it had: the passes that look at a model
(statistics, retention, FLOPs, routing figures) must not train it or leave it changed. """
from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn

__all__ = ['eval_mode']


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; ``model.train(mode it had)`` after, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
