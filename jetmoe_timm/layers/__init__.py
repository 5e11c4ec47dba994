from .entmax import entmax15
from .reference import sphero_moe_reference
from .sphero_moe import ROUTING_PRESETS, ExpertLinear, ExpertMlp, SpheroMoE, free_no_grad_buffers, \
    set_autocast_weight_cache, set_keep_grad_memory
