from .vit_jetmoe import VisionTransformerJetMoE
from .convnext_jetmoe import ConvNeXtJetMoE


def is_jetmoe_model(name: str) -> bool:
    """Whether timm's model ``name`` ('arch' or 'arch.tag') is one jetmoe_timm registers (SpheroMoE layers)."""
    import timm
    arch = name.partition('.')[0]
    return timm.is_model(arch) and timm.models.model_entrypoint(arch).__module__.startswith(__name__)
