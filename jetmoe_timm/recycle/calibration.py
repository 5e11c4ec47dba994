""" Calibration images for activation statistics.

Sources (``calib``):
    'synthetic' (default)  deterministic procedural images: multi-octave Gaussian noise with a 1/f-like
                           spectrum and random colour mixing, seeded; works offline, needs no download
    a folder               every image below it (any depth), a seeded subset of ``num_images``
    a Dataset/DataLoader   yields images (PIL or tensors) or (image, label) pairs
PIL images go through the predecessor's own eval transform (timm's ``resolve_data_config``) at the input size
asked for (2- and 4-band ones are normalised and resized band by band, without its crop); float tensors are taken
as already normalised, and resized only to a size asked for or the one size a fixed-size model (a ViT) takes.
Images are read in the model's channels: grey ('L'), RGB, or for 2 and 4 channels 'LA' and 'RGBA' (a multispectral
model's 4-band TIFFs), 16-bit and 0..1 float grey images scaled to 8 bits; synthetic images are drawn in any number
of channels.
"""
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config

from .selection import make_generator

__all__ = ['IMAGE_EXTENSIONS', 'ImageListing', 'calibration_batches', 'check_calibration', 'first_conv',
           'fit_channels', 'fixed_input_size', 'image_mode', 'image_tensor', 'in_mode', 'input_channels', 'list_images',
           'model_data_config', 'synthetic_image']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff', '.gif')


_PIL_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}  # the image mode read for a model of these channels


def image_mode(chans: int, instead: str) -> str:
    """The PIL mode image files are read in for a model of ``chans`` input channels. Above 4 channels no image file
    mode fits: refused in one line that ends with ``instead``, what to give in place of files."""
    if chans not in _PIL_MODES:
        raise ValueError(f'image files hold at most 4 channels, the model takes {chans}: {instead}')
    return _PIL_MODES[chans]


def in_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` in ``mode``: a 4-band file PIL reads as CMYK keeps its bands as they are (a multispectral TIFF), any
    other image goes through PIL's convert (which adds an opaque alpha band to 3-band images read as RGBA), 16-bit
    grey and 0..1 float images scaled to 8 bits first (``_as_8_bit``)."""
    if len(im.getbands()) == 4 == len(mode) and im.mode != mode:
        return Image.merge(mode, [band.convert('L') for band in im.split()])
    return _as_8_bit(im).convert(mode)


def _as_8_bit(im: Image.Image) -> Image.Image:
    """A wide grey image in 0..255: PIL's convert clips at 255, which turns all but the darkest pixels of a 16-bit
    image white (and a 0..1 float one black). 16-bit are modes 'I;16*' (PNG, TIFF), 'I' read from a PGM (16-bit
    there, a dark one too) and other 'I' images that hold values above 255 (an 8-bit image widened to 'I', or a
    32-bit TIFF of 8-bit values, is taken as it is); float ('F') images of values up to 1 are scaled by 255."""
    if im.mode.startswith('I;16') or im.mode == 'I' and (im.format == 'PPM' or im.getextrema()[1] > 255):
        return im.convert('I').point(lambda v: v / 257 + 0.5)  # 0..65535 -> 0..255, rounded
    if im.mode == 'F' and im.getextrema()[1] <= 1.:
        return im.point(lambda v: v * 255 + 0.5)
    return im


def image_tensor(img: Image.Image, data_cfg: Dict[str, Any], transform) -> torch.Tensor:
    """One image, already in the model's mode, as its (C, H, W) input: 1 and 3 channels through ``transform``
    (timm's eval transform of ``data_cfg``), 2 and 4 band by band (``_bands_input``)."""
    chans = data_cfg['input_size'][0]
    if chans in (1, 3):
        return transform(img)
    return _bands_input(torch.from_numpy(np.array(img)).reshape(img.height, img.width, chans), data_cfg)


def _resized(img: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """A ready (C, H, W) tensor resized to ``size`` (antialiased bicubic); as it is where it has that size or
    ``size`` is None."""
    if size is None or tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None].float(), size=size, mode='bicubic', antialias=True, align_corners=False)[0]


def _synthetic_pixels(index: int, size: int, seed: int, chans: int = 3) -> torch.Tensor:
    """(size, size, chans) uint8: octaves of upsampled noise, amplitude ~ 1/frequency, channels mixed."""
    g = make_generator(seed, 'synthetic', index)
    img = torch.zeros(1, chans, size, size)
    for octave in range(1, 7):
        res = 2 ** octave
        noise = torch.randn(1, chans, res, res, generator=g)
        img += F.interpolate(noise, size=(size, size), mode='bicubic', align_corners=False) / res ** 0.5
    mix = torch.randn(chans, chans, generator=g) * 0.5 + torch.eye(chans)
    img = torch.einsum('ij,bjhw->bihw', mix, img)
    img = torch.sigmoid(img * 1.5 + torch.randn(1, chans, 1, 1, generator=g) * 0.5)
    return (img[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)


def synthetic_image(index: int, size: int = 224, seed: int = 0) -> Image.Image:
    """A deterministic, natural-looking RGB image."""
    return Image.fromarray(_synthetic_pixels(index, size, seed).numpy(), mode='RGB')


def _bands_input(pixels: torch.Tensor, data_cfg: Dict[str, Any]) -> torch.Tensor:
    """(H, W, C) uint8 pixels -> the model's (C, H, W) input: normalised with ``data_cfg``'s mean / std, then
    resized to its input size, each band on its own. Images of other than 1 or 3 channels take this way: PIL's
    resampling premultiplies the colours by a 4th or 2nd (alpha) band."""
    x = pixels.permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(data_cfg['mean'])[:, None, None]) / torch.tensor(data_cfg['std'])[:, None, None]
    return _resized(x, data_cfg['input_size'][1:])


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files below ``folder``, any depth, linked folders too (a dataset assembled from links; each real folder
    once, so a link loop ends), in the order the file system lists them."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (p for p in map(Path(root).joinpath, files) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _check_image_folder(folder: Path) -> None:
    """Raise one clear line for a folder that cannot feed calibration. Stops at the first image: an ImageNet-sized
    folder is walked once, when its images are drawn, not at every check on the way."""
    if not folder.exists():
        raise FileNotFoundError(f"calibration folder '{folder}' does not exist: pass an existing image folder, "
                                f"or calib='synthetic' (--calib synthetic) for the built-in images.")
    if not folder.is_dir() or not os.access(folder, os.R_OK | os.X_OK):
        raise ValueError(f"calibration path '{folder}' is not a readable folder: pass a folder of images.")
    if next(_walk_images(folder), None) is None:
        raise ValueError(f"calibration folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                         f"add some, or use calib='synthetic' (--calib synthetic).")


class ImageListing(NamedTuple):
    """A calibration folder's image files, listed once and sorted: every pass over the folder (statistics, the
    retention figure's two) draws from this one list."""
    folder: Path
    files: Tuple[Path, ...]


def list_images(folder: Union[str, os.PathLike]) -> ImageListing:
    folder = Path(folder)
    _check_image_folder(folder)
    return ImageListing(folder, tuple(sorted(_walk_images(folder))))


def fixed_input_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """(H, W) of a model that takes one input size (a ViT's patch embedding); None for any-size models."""
    pe = getattr(model, 'patch_embed', None)
    if pe is None or getattr(pe, 'dynamic_img_size', False):
        return None
    return tuple(pe.img_size)


def check_calibration(calib) -> None:
    """Raise a clear error now for a calibration source that cannot work (a missing or empty folder, ...)."""
    if calib is None or calib in ('synthetic', 'weights') or isinstance(calib, ImageListing) \
            or isinstance(calib, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return
    if isinstance(calib, (str, os.PathLike)):
        _check_image_folder(Path(calib))
        return
    raise ValueError(f'calib must be a folder path, a Dataset/DataLoader, "synthetic" or "weights", got '
                     f'{type(calib).__name__}.')


def _folder_images(listing: ImageListing, num_images: int, seed: int, mode: str = 'RGB') -> Iterator[Image.Image]:
    files = listing.files
    order = torch.randperm(len(files), generator=make_generator(seed, 'calib-folder')).tolist()
    taken = skipped = filled = 0
    for i in order:
        if taken == num_images:
            break
        try:
            with Image.open(files[i]) as im:
                # PIL adds an opaque alpha band to an image without one (RGB read as LA too)
                filled += 'A' in mode and 'A' not in im.getbands() and len(im.getbands()) != len(mode)
                img = in_mode(im, mode)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            skipped += 1
            warnings.warn(f'skipping calibration image {files[i]} that cannot be decoded: {e}')
            continue
        taken += 1
        yield img
    if skipped:
        warnings.warn(f'{skipped} calibration image(s) could not be decoded and were skipped')
    if 0 < taken < num_images:
        warnings.warn(f"calibration took {taken} images from '{listing.folder}', fewer than the {num_images} asked "
                      f"for: statistics of fewer images are noisier; add images to it (lowering num_calib, "
                      f"--num-calib, only silences this)")
    if filled:
        warnings.warn(f'{filled} calibration image(s) had no band of their own for the last of the {len(mode)} '
                      f'channels the model takes: it is an opaque alpha band ({mode}); pass images of {len(mode)} '
                      f'channels for statistics of real data')
    if taken == 0:
        raise ValueError(f"no image in '{listing.folder}' could be decoded: check the files, or use "
                         f"calib='synthetic' (--calib synthetic).")


def _batched(images, data_cfg: Dict[str, Any], transform, batch_size: int,
             size: Optional[Tuple[int, int]] = None) -> Iterator[torch.Tensor]:
    """Batches of transformed images: PIL images read as a folder's are (``in_mode``, ``image_tensor``), ready
    tensors only resized (antialiased bicubic) to ``size``."""
    chans = data_cfg['input_size'][0]
    batch = []
    for img in images:
        if isinstance(img, Image.Image):
            mode = image_mode(chans, f'calibrate with synthetic images or ready {chans}-channel tensors.')
            img = image_tensor(in_mode(img, mode), data_cfg, transform)
        elif not img.is_floating_point():  # torchvision's read_image / PILToTensor: 0..255, not normalised
            raise ValueError(f"calibration tensors are taken as normalised model inputs, got {img.dtype} ones (pixel "
                             f"values?): give PIL images (the model's own transform normalises them) or float "
                             f"tensors normalised with its mean and std.")
        else:
            img = _resized(img, size)
        batch.append(img)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def first_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    """The conv that takes the images: timm's ``first_conv`` of the pretrained cfg, else the model's first Conv2d."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')
    try:
        conv = model.get_submodule(name) if name else None
    except AttributeError:
        conv = None
    return conv if isinstance(conv, nn.Conv2d) else next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def input_channels(model: nn.Module) -> Optional[int]:
    """The input channels ``model`` takes (its first conv's), None for a model without a conv."""
    conv = first_conv(model)
    return conv.in_channels if conv is not None else None


def _to_chans(values, chans: int) -> Tuple[float, ...]:
    """The cfg's per-channel mean or std for a model built with ``chans`` input channels, as timm adapts the stem
    (``adapt_input_conv``): one channel sums the RGB filters (the mean value), more repeat them in turn."""
    return (sum(values) / len(values),) if chans == 1 else tuple(values[i % len(values)] for i in range(chans))


def fit_channels(data_cfg: Dict[str, Any], chans: int) -> Dict[str, Any]:
    """``data_cfg`` for a model of ``chans`` input channels: timm keeps the pretrained cfg's 3-channel input size,
    mean and std for a model built with another ``in_chans``."""
    mean, std = data_cfg.get('mean', IMAGENET_DEFAULT_MEAN), data_cfg.get('std', IMAGENET_DEFAULT_STD)  # timm's
    if chans == data_cfg['input_size'][0] and len(mean) == len(std) == chans:
        return data_cfg
    return dict(data_cfg, input_size=(chans, *data_cfg['input_size'][1:]), mean=_to_chans(mean, chans),
                std=_to_chans(std, chans))


def model_data_config(model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """timm's eval data config for ``model`` as it was built: at ``img_size`` (H, W), by default the one size a
    fixed-size model takes (the pretrained cfg keeps the registered one, 224), in its input channels."""
    data_cfg = resolve_data_config({}, model=model)
    img_size = img_size or fixed_input_size(model)
    if img_size is not None:
        data_cfg['input_size'] = (data_cfg['input_size'][0], *img_size)
    chans = input_channels(model)
    return fit_channels(data_cfg, chans) if chans is not None else data_cfg


def calibration_batches(
        calib: Union[str, os.PathLike, torch.utils.data.Dataset, torch.utils.data.DataLoader, None],
        model: nn.Module,
        num_images: int = 256,
        batch_size: int = 32,
        seed: int = 0,
        img_size: Optional[Tuple[int, int]] = None,
) -> Tuple[Iterator[torch.Tensor], int, str]:
    """(batches, number of batches, description) of calibration images transformed for ``model``.

    Images get ``model``'s own preprocessing (mean, std, interpolation, crop) at ``img_size`` (H, W), by default
    the model's input size.
    """
    data_cfg = model_data_config(model, img_size)
    img_size = img_size or fixed_input_size(model)  # what ready tensors are resized to (None: any size)
    chans = data_cfg['input_size'][0]
    transform = create_transform(**data_cfg, is_training=False)
    total = -(-num_images // batch_size)
    if calib is None or calib == 'synthetic':
        size = data_cfg['input_size'][-1]
        if chans in (1, 3):  # drawn in RGB, read as the model's mode through its own eval transform
            images = (synthetic_image(i, size, seed) for i in range(num_images))
            return _batched(images, data_cfg, transform, batch_size), total, f'synthetic:{num_images}:seed{seed}'
        images = (_bands_input(_synthetic_pixels(i, size, seed, chans), data_cfg) for i in range(num_images))
        return _batched(images, data_cfg, transform, batch_size), total, f'synthetic:{num_images}:seed{seed}'
    if isinstance(calib, (str, os.PathLike)):
        calib = list_images(calib)  # fails now, with a clear message, rather than mid-way
    if isinstance(calib, ImageListing):
        mode = image_mode(chans, 'calibrate with synthetic images (--calib synthetic) or a Dataset of ready '
                                 f'{chans}-channel tensors.')
        count = min(num_images, len(calib.files))  # what the folder can give (less any it cannot decode)
        images = (image_tensor(img, data_cfg, transform) for img in _folder_images(calib, num_images, seed, mode))
        return (_batched(images, data_cfg, transform, batch_size), -(-count // batch_size),
                f'folder:{calib.folder.name}:{count}')
    from_dataset = isinstance(calib, torch.utils.data.Dataset)
    if from_dataset:  # batches are lists of the dataset's own items: images, or (image, label, ...) tuples
        calib = torch.utils.data.DataLoader(calib, batch_size=batch_size, shuffle=False,
                                            collate_fn=lambda items: items)
    if isinstance(calib, torch.utils.data.DataLoader):
        def loader_images():
            n = 0
            for batch in calib:
                items = batch
                if not from_dataset:  # a collated (images, labels) batch, an images batch, or (batch_size=None) one
                    if isinstance(batch, (tuple, list)) and torch.is_tensor(batch[0]):
                        items = batch[0]
                    if torch.is_tensor(items) and items.ndim == 3:
                        items = [items]
                for item in items:
                    if isinstance(item, (tuple, list)):
                        item = item[0]
                    yield item
                    n += 1
                    if n == num_images:
                        return
        # ready tensors are resized only for a model that takes one size (a ViT) or to a size asked for
        return (_batched(loader_images(), data_cfg, transform, batch_size, img_size), total, f'loader:{num_images}')
    raise ValueError(f'calib must be a folder path, a Dataset/DataLoader or "synthetic", got {type(calib).__name__}')
