"""Test-suite setup: offline by default, tiny models, isolated caches.

huggingface_hub reads its environment at import, so everything is set here before any test imports it.
"""
import os
import tempfile

_SESSION_TMP = tempfile.mkdtemp(prefix='jetmoe_timm_tests_')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ['HF_HUB_DISABLE_XET'] = '1'
os.environ['HF_HUB_DISABLE_TELEMETRY'] = '1'
os.environ['HF_HOME'] = os.path.join(_SESSION_TMP, 'hf_home')
os.environ['TORCH_HOME'] = os.path.join(_SESSION_TMP, 'torch_home')
os.environ['JETMOE_TIMM_CACHE'] = os.path.join(_SESSION_TMP, 'jetmoe_cache')

import pytest  # noqa: E402
import torch  # noqa: E402

import jetmoe_timm  # noqa: E402,F401  (registers the models)

torch.set_num_threads(2)

# The smallest configurations of each family that still exercise every code path.
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4,
                num_univ_experts=8)


@pytest.fixture
def tiny_vit_kwargs():
    return dict(TINY_VIT)
