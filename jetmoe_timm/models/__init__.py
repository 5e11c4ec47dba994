import functools
from typing import List

from .vit_jetmoe import VisionTransformerJetMoE
from .convnext_jetmoe import ConvNeXtJetMoE
from ._moe import JetMoEMixin

__all__ = ['ConvNeXtJetMoE', 'JetMoEMixin', 'VisionTransformerJetMoE', 'check_model_name', 'is_jetmoe_model',
           'list_jetmoe_models']


def list_jetmoe_models() -> List[str]:
    """The JetMoE architectures this package registers with timm, every family's (the entrypoints of the modules
    that define a ``JetMoEMixin`` model), whatever their names."""
    import timm
    return timm.list_models(module=sorted({cls.__module__.rpartition('.')[2] for cls in JetMoEMixin.__subclasses__()}))


def check_model_name(model: str) -> str:
    """The architecture of ``model`` ('arch' or 'arch.tag'); an unknown one is named, with a "did you mean" and the
    JetMoE models to pick from."""
    import timm
    from .._names import did_you_mean
    arch = model.partition('.')[0]
    if not timm.is_model(arch):
        models = list_jetmoe_models()
        raise ValueError(f"Unknown model '{arch}'{did_you_mean(arch, models)}: pick one of {models}.")
    return arch


def is_jetmoe_model(name: str) -> bool:
    """Whether timm's model ``name`` ('arch' or 'arch.tag') is a JetMoE model (a ``JetMoEMixin``: SpheroMoE layers),
    whoever registered it."""
    import timm
    arch = name.partition('.')[0]
    return timm.is_model(arch) and _is_jetmoe_arch(arch)


@functools.lru_cache(maxsize=None)
def _is_jetmoe_arch(arch: str) -> bool:
    import timm
    try:
        return isinstance(timm.create_model(arch, device='meta'), JetMoEMixin)  # meta: no memory, no init
    except Exception:  # a model that cannot be built without arguments is no JetMoE model of ours
        return False
