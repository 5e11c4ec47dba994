""" jetmoe_timm: MoE Jetpack vision models for timm.

``import jetmoe_timm`` registers the V-JetMoE (and C-JetMoE) models with timm, so that
``timm.create_model('v_jetmoe_tiny', pretrained=True)`` works.
"""
from .version import __version__
from .layers import SpheroMoE, entmax15, set_autocast_weight_cache, set_keep_grad_memory
from .models import VisionTransformerJetMoE
from .models import ConvNeXtJetMoE
from .routing import routing_info, set_routing_capture
from .optim import AdafactorLean, register_optimizers
# importing the recycle subpackage also registers the weight builder that pretrained=True loads fall back on
from .recycle import convert

register_optimizers()  # train.py --opt adafactorlean

__all__ = ['__version__', 'SpheroMoE', 'entmax15', 'VisionTransformerJetMoE', 'ConvNeXtJetMoE', 'routing_info',
           'set_routing_capture', 'set_keep_grad_memory', 'set_autocast_weight_cache', 'convert', 'AdafactorLean']
