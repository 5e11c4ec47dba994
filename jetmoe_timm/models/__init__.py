from .vit_jetmoe import VisionTransformerJetMoE
from .convnext_jetmoe import ConvNeXtJetMoE
