from ._eager_memory import free_no_grad_buffers
from .entmax import entmax15
from .experts import ExpertLinear, ExpertMlp, set_autocast_weight_cache, set_keep_grad_memory
from .reference import sphero_moe_reference
from .sphero_moe import ROUTING_PRESETS, SpheroMoE

__all__ = ['ExpertLinear', 'ExpertMlp', 'ROUTING_PRESETS', 'SpheroMoE', 'entmax15', 'free_no_grad_buffers',
           'set_autocast_weight_cache', 'set_keep_grad_memory', 'sphero_moe_reference']
