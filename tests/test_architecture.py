"""The package's layering holds: layers <- models <- recycling <- tools, with no way back and no circle."""
import ast
from pathlib import Path

import pytest
import timm
from timm.models.vision_transformer import ResPostBlock

from jetmoe_timm.models._pretrained import _architecture_kwargs
from jetmoe_timm.models.vit_jetmoe import VisionTransformerJetMoE

PACKAGE = Path(__file__).resolve().parents[1] / 'jetmoe_timm'
CORE = sorted(p for p in PACKAGE.rglob('*.py') if 'tools' not in p.relative_to(PACKAGE).parts
              and p.name not in ('train.py', 'validate.py'))  # the two launchers are tools kept at their paths


def _imports(path: Path):
    """Every jetmoe_timm module ``path`` imports, at any depth of the file, as dotted names."""
    package = path.relative_to(PACKAGE.parent).with_suffix('').parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            out.add('.'.join(base + tuple(filter(None, (node.module or '').split('.')))))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith('jetmoe_timm'))
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jetmoe_timm'):
            out.add(node.module)
    return out


def _modules(sub):
    return sorted((PACKAGE / sub).glob('*.py'))


def _name(path):
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize('path', CORE, ids=_name)
def test_core_never_imports_tools(path):
    bad = {m for m in _imports(path) if m.startswith('jetmoe_timm.tools')}
    assert not bad, f'{_name(path)} imports {bad}'


@pytest.mark.parametrize('path', _modules('layers') + _modules('models'), ids=_name)
def test_layers_and_models_never_import_recycling(path):
    bad = {m for m in _imports(path) if m.startswith('jetmoe_timm.recycle')}
    assert not bad, f'{_name(path)} imports {bad}'


@pytest.mark.parametrize('path', _modules('recycle'), ids=_name)
def test_recycling_engine_reaches_models_only_through_family_specs(path):
    models = {m for m in _imports(path) if m.startswith('jetmoe_timm.models')}
    # family modules name their model class; build registers the weight builder; predecessor raises the models'
    # WeightsUnavailableError and reads their input-contract keys
    allowed = {'vit.py', 'convnext.py', 'build.py', 'predecessor.py'}
    assert not models or path.name in allowed, f'{path.name} imports {models}'


V_JETMOE_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, global_pool='avg',
                     num_core_experts=98, num_univ_experts=196)


@pytest.mark.parametrize('kwargs, changes', [
    (dict(routing='official'), {}),
    (dict(moe_combine='entmax15', moe_noise_at_eval=True), {}),  # the same weights as routing='official'
    (dict(drop_path_rate=0.1, moe_drop_rate=0.4, num_classes=5, in_chans=1), {}),  # adapted or shape-free
    (dict(img_size=112, drop_path_rate=0.1), dict(img_size=112)),
    (dict(embed_dim=96, num_heads=2, moe_drop_rate=0.1), dict(embed_dim=96, num_heads=2)),
    (dict(routing='softmoe', num_univ_experts=0), dict(routing='softmoe', num_univ_experts=0)),
    (dict(global_pool='token'), dict(global_pool='token')),  # norm instead of fc_norm: other keys
    # two that make the same change: each looks idle with the other there, one of them counts
    (dict(global_pool='token', fc_norm=False, drop_rate=0.1), dict(global_pool='token')),
    (dict(num_heads=6), dict(num_heads=6)),  # same shapes, other heads: recycled weights differ
    (dict(block_fn=ResPostBlock), dict(block_fn=ResPostBlock)),  # same shapes, post-norm blocks
    (dict(act_layer='relu', drop_rate=0.1), dict(act_layer='relu')),  # same shapes, another activation
])
def test_architecture_change_is_decided_by_tensor_shapes(kwargs, changes):
    cfg = timm.models.get_pretrained_cfg('v_jetmoe_tiny.recycled_in21k')
    assert _architecture_kwargs(VisionTransformerJetMoE, cfg, V_JETMOE_TINY, kwargs) == changes
