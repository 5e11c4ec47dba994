from ._eager_memory import free_no_grad_buffers
from .entmax import entmax15
from .experts import ExpertLinear, ExpertMlp, set_autocast_weight_cache, set_keep_grad_memory
from .reference import sphero_moe_reference
from .sphero_moe import ROUTING_PRESETS, SpheroMoE
