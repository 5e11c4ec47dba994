from .vit_jetmoe import VisionTransformerJetMoE
