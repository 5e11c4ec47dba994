"""Routing inspection figures: the numbers are checked against an independent recomputation, the files are
read back, and the ``inspect`` command runs end to end on real checkpoint files."""
import importlib.util
import json
import os
import stat

import numpy as np
import pytest
import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
import torch
from PIL import Image

from jetmoe_timm.tools import cli
from jetmoe_timm.export import save_pretrained_folder, save_safetensors_atomic
from jetmoe_timm.layers import SpheroMoE
from jetmoe_timm.tools.visualize import inspect_routing, plot_dispatch_maps, save_inspection
from jetmoe_timm.tools.checks import parse_model_kwargs

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec('matplotlib') is None, reason='figures need matplotlib (pip install -e ".[test]")')

TINY_CONVNEXT = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=2, num_univ_experts=4)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _moe_io(model):
    """Hooks that keep each SpheroMoE layer's input and output of the next forward pass."""
    io, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, SpheroMoE):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: io.__setitem__(name, (args[0], out))))
    return io, hooks


def _write_images(tmp_path, n=2, size=(40, 30)):
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = tmp_path / f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_contributions_add_up_and_dispatch_sums_to_one(tiny_vit_kwargs):
    # a non-square grid and 2 slots per expert exercise the reshapes
    kwargs = dict(tiny_vit_kwargs, img_size=(32, 48), slots_per_expert=2)
    model = timm.create_model('v_jetmoe_tiny', **kwargs).train()  # inspection must switch noise off itself
    x = torch.randn(3, 3, 32, 48)
    io, hooks = _moe_io(model)
    result = inspect_routing(model, x)
    for h in hooks:
        h.remove()

    assert model.training and not any(m.capture_routing or m.last_routing is not None
                                      for m in model.modules() if isinstance(m, SpheroMoE))
    again = inspect_routing(model, x)  # eval routing is deterministic
    assert list(result.layers) == ['blocks.2.mlp', 'blocks.3.mlp'] == list(io)
    for name, lr in result.layers.items():
        out = io[name][1].numpy()
        assert lr.grid == (8, 12) and lr.num_prefix_tokens == 1
        np.testing.assert_allclose(lr.core_out + lr.univ_out, out, atol=1e-5)
        np.testing.assert_allclose(again.layers[name].dispatch, lr.dispatch)
        np.testing.assert_allclose(lr.dispatch.sum(1), 1, atol=1e-5)  # over tokens
        np.testing.assert_allclose(lr.combine.sum(2), 1, atol=1e-5)  # over slots
        maps = lr.expert_dispatch
        assert maps.shape == (3, 12, 8, 12)
        np.testing.assert_allclose(maps.sum((2, 3)) + lr.prefix_dispatch, 1, atol=1e-5)
        shares = lr.path_shares
        np.testing.assert_allclose(shares['core'] + shares['univ'], 1, atol=1e-9)
        rms = np.sqrt((out.astype(np.float64) ** 2).sum(-1).mean(-1))
        np.testing.assert_allclose(lr.path_norms['output'], rms, rtol=1e-5)
        np.testing.assert_allclose(lr.expert_share.sum(-1), 1, rtol=1e-5)


def test_expert_importance_matches_independent_recomputation(tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', slots_per_expert=2, **tiny_vit_kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    io, hooks = _moe_io(model)
    result = inspect_routing(model, x)
    for h in hooks:
        h.remove()

    for name, lr in result.layers.items():
        layer = model.get_submodule(name)
        tokens = io[name][0]
        with torch.no_grad():
            logits = layer.routing_logits(tokens)
            t = layer.temperature
            dispatch = (logits / t[0]).softmax(1)
            combine = (logits / t[-1]).softmax(-1)
            np.testing.assert_allclose(lr.dispatch, dispatch.numpy(), atol=1e-6)
            S = layer.slots_per_expert
            contrib = torch.zeros(2, layer.num_experts)
            core_sum = torch.zeros(2, layer.dim)
            for e in range(layer.num_experts):
                group, i = ((layer.core_experts, e) if e < layer.num_core_experts
                            else (layer.univ_experts, e - layer.num_core_experts))
                for s in range(S):
                    m = e * S + s
                    slot = torch.einsum('bn,bnd->bd', dispatch[..., m], tokens)
                    h = group.act(slot @ group.fc1.weight[i] + group.fc1.bias[i])
                    y = h @ group.fc2.weight[i] + group.fc2.bias[i]
                    v = combine[..., m].sum(1, keepdim=True) * y  # what slot m adds to the output, over all tokens
                    contrib[:, e] += v.norm(dim=-1)
                    if e < layer.num_core_experts:
                        core_sum += v
        np.testing.assert_allclose(lr.expert_contrib, contrib.numpy(), rtol=1e-4)
        np.testing.assert_allclose(lr.core_out.sum(1), core_sum.numpy(), rtol=1e-4, atol=1e-6)
        for path, idx in (('core', np.arange(4)), ('univ', np.arange(4, 12))):
            expected = idx[np.argsort(-contrib.numpy()[:, idx], axis=-1)[:, :3]]
            np.testing.assert_array_equal(lr.top_experts(path, 3), expected)
            assert (np.diff(lr.expert_contrib[np.arange(2)[:, None], lr.top_experts(path, 3)]) <= 0).all()


def test_dispatch_maps_are_laid_out_on_the_image(tiny_vit_kwargs):
    """One bright patch in a black image: every expert's map must single out that patch's cell."""
    model = timm.create_model('v_jetmoe_tiny', **dict(tiny_vit_kwargs, img_size=(32, 48), moe_blocks=[0])).eval()
    with torch.no_grad():  # tokens reach the MoE unmixed: no attention output, no position embedding
        model.blocks[0].attn.proj.weight.zero_()
        model.blocks[0].attn.proj.bias.zero_()
        model.pos_embed.zero_()
        model.patch_embed.proj.bias.zero_()
    x = torch.zeros(1, 3, 32, 48)
    x[..., 8:12, 36:40] = 1.  # patch row 2, column 9 of the 8 x 12 grid
    maps = inspect_routing(model, x).layers['blocks.0.mlp'].expert_dispatch[0]
    for m in maps:
        assert np.unravel_index(np.abs(m - np.median(m)).argmax(), m.shape) == (2, 9)


def test_convnext_tokens_are_the_map_positions():
    model = timm.create_model('c_jetmoe_femto', **TINY_CONVNEXT)
    result = inspect_routing(model, torch.randn(2, 3, 64, 96))
    assert {n: lr.grid for n, lr in result.layers.items()} == {
        'stages.2.blocks.0.mlp': (4, 6), 'stages.2.blocks.1.mlp': (4, 6), 'stages.3.blocks.0.mlp': (2, 3)}
    for lr in result.layers.values():
        assert lr.num_prefix_tokens == 0
        np.testing.assert_allclose(lr.expert_dispatch.sum((2, 3)), 1, atol=1e-5)


@needs_matplotlib
def test_figures_and_json_are_written(tmp_path, tiny_vit_kwargs):
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)
    images = _write_images(tmp_path)
    result = inspect_routing(model, images)
    assert result.images.shape == (2, 32, 32, 3) and result.names == ['img0.png', 'img1.png']
    assert 0 <= result.images.min() and result.images.max() <= 1
    written = save_inspection(result, tmp_path / 'out', top_k=2)
    assert sorted(p.name for p in written) == [
        'contributions.png', 'dispatch_blocks.2.mlp.png', 'dispatch_blocks.3.mlp.png', 'routing.json']
    umask = os.umask(0)
    os.umask(umask)
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not a private temp file
    for p in written[:-1]:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
            assert min(im.size) > 300
    assert not list((tmp_path / 'out').glob('.*'))  # no temporary files left

    data = json.loads((tmp_path / 'out' / 'routing.json').read_text())
    assert data['model'] == 'v_jetmoe_tiny' and data['images'] == result.names
    for name, lr in result.layers.items():
        d = data['layers'][name]
        assert d['grid'] == [8, 8] and d['num_core_experts'] == 4 and d['num_univ_experts'] == 8
        np.testing.assert_allclose(d['core_share'], lr.path_shares['core'], rtol=1e-5)
        np.testing.assert_allclose(np.array(d['core_share']) + d['univ_share'], 1, atol=1e-5)
        for b in range(2):
            for path in ('core', 'univ'):
                top = d['top_experts'][b][path]
                assert [t['expert'] for t in top] == lr.top_experts(path, 2)[b].tolist()
                np.testing.assert_allclose(top[0]['dispatch'], lr.expert_dispatch[b, top[0]['expert']], rtol=1e-5)
    with pytest.raises(ValueError, match='No MoE layer'):
        plot_dispatch_maps(result, 'blocks.0.mlp')


TINY_ARGS = ['img_size=32', 'patch_size=4', 'embed_dim=32', 'depth=4', 'num_heads=2', 'num_core_experts=4',
             'num_univ_experts=8']


@needs_matplotlib
@pytest.mark.parametrize('kind', ['safetensors', 'pth', 'folder'])
def test_cli_inspect_end_to_end(tmp_path, tiny_vit_kwargs, kind, capsys):
    model = timm.create_model('v_jetmoe_tiny', num_classes=0, **tiny_vit_kwargs)
    if kind == 'safetensors':
        checkpoint = save_safetensors_atomic(model.state_dict(), tmp_path / 'weights.safetensors')
    elif kind == 'pth':  # a training checkpoint: the weights under 'state_dict'
        checkpoint = tmp_path / 'checkpoint.pth'
        torch.save({'state_dict': model.state_dict(), 'epoch': 3}, checkpoint)
    else:
        checkpoint = save_pretrained_folder(model, tmp_path / 'folder')
    images = _write_images(tmp_path)
    out = tmp_path / 'out'
    for _ in range(2):  # a second run writes into its own earlier output
        rc = cli.main(['inspect', 'v_jetmoe_tiny', *images, '--checkpoint', str(checkpoint), '--out', str(out),
                       '--top-k', '2', '--model-kwargs', 'num_classes=0', *TINY_ARGS])
        assert rc == 0, capsys.readouterr().err
        assert 'wrote 4 files' in capsys.readouterr().out
    data = json.loads((out / 'routing.json').read_text())
    expected = inspect_routing(model, images)  # the CLI must have run these very weights on these images
    for name, lr in expected.layers.items():
        np.testing.assert_allclose(data['layers'][name]['expert_share'], lr.expert_share, rtol=1e-4)
    assert (out / 'dispatch_blocks.3.mlp.png').read_bytes()[:8] == PNG_MAGIC


def test_cli_inspect_errors(tmp_path, capsys):
    images = _write_images(tmp_path, n=1)
    convnext = save_pretrained_folder(timm.create_model('c_jetmoe_femto', **TINY_CONVNEXT), tmp_path / 'convnext')
    kwargs = parse_model_kwargs(TINY_ARGS)
    other = save_pretrained_folder(timm.create_model('v_jetmoe_tiny', **dict(kwargs, num_core_experts=3)),
                                   tmp_path / 'other')
    cases = [
        (['v_jetmoe_tiny', str(tmp_path / 'missing.jpg')], 'Image not found'),
        (['v_jetmoe_tiny', *images, '--checkpoint', str(tmp_path / 'nope.safetensors')], 'Checkpoint not found'),
        (['v_jetmoe_tiny', *images, '--checkpoint', str(tmp_path), '--pretrained'], 'pass only one'),
        (['v_jetmoe_tiny', *images, '--checkpoint', str(tmp_path)], 'has no config.json'),
        (['v_jetmoe_tiny', *images, '--checkpoint', str(convnext)], "holds a 'c_jetmoe_femto'"),
        (['v_jetmoe_tiny', *images, '--top-k', '0'], '--top-k must be >= 1'),
        # the weights file of a folder made with other kwargs: the folder, whose config.json knows them
        (['v_jetmoe_tiny', *images, '--checkpoint', str(other / 'model.safetensors')],
         f'Or pass the folder it is in, whose config.json describes the model: --checkpoint {other}'),
    ]
    for args, message in cases:
        assert cli.main(['inspect', *args, '--model-kwargs', *TINY_ARGS, '--out', str(tmp_path / 'o')]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_grey_models_take_grey_images(tmp_path):
    """A model built with in_chans=1 gets one-channel inputs, normalised as recycling's calibration does (the mean
    of the RGB statistics, as timm sums the RGB stem; inspect took the red channel's), shown as RGB."""
    from jetmoe_timm.recycle.calibration import calibration_batches
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                              num_core_experts=4, num_univ_experts=8, in_chans=1,
                              pretrained_cfg_overlay=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)).eval()
    img = Image.fromarray((np.random.default_rng(0).random((28, 28, 3)) * 255).astype('uint8'))
    img.save(tmp_path / 'img.png')
    inputs = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    result = inspect_routing(model, [img])
    (calibrated,) = calibration_batches(tmp_path, model, num_images=1, batch_size=1)[0]
    torch.testing.assert_close(inputs[0], calibrated)
    inspect_routing(model, [img], data_config={'input_size': (1, 32, 32)})  # a partial config: timm's mean / std
    assert inputs[-1].shape == (1, 1, 32, 32)
    assert result.images.shape == (1, 32, 32, 3)
    assert np.allclose(result.images[..., 0], result.images[..., 2])  # grey, shown in three equal channels
    layer = result.layers['blocks.3.mlp']
    assert np.allclose(layer.dispatch.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize('chans', [2, 4])
def test_multiband_models_take_their_bands(tmp_path, chans):
    """A 2- or 4-channel model (grey + alpha, RGB + near infrared) gets its images in its own channels, band for
    band as recycling's calibration reads them (a 4-band TIFF too; inspect fed such models RGB and failed in the
    patch embedding), shown without the extra band; a 5-channel model is told to pass a tensor."""
    from jetmoe_timm.recycle.calibration import calibration_batches
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4,
                  num_univ_experts=8)
    model = timm.create_model('v_jetmoe_tiny', in_chans=chans, **kwargs).eval()
    pixels = (np.random.default_rng(0).random((40, 36, chans)) * 255).astype('uint8')
    if chans == 4:  # a multispectral TIFF that PIL reads as CMYK: its bands must not be colour-converted
        Image.fromarray(pixels, 'CMYK').save(tmp_path / 'img.tif')
    else:
        Image.fromarray(pixels, 'LA').save(tmp_path / 'img.png')
    path = next(tmp_path.iterdir())
    inputs = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    result = inspect_routing(model, [path])
    (calibrated,) = calibration_batches(tmp_path, model, num_images=1, batch_size=1)[0]
    assert inputs[0].shape == (1, chans, 32, 32)
    torch.testing.assert_close(inputs[0], calibrated)
    assert result.images.shape == (1, 32, 32, 3)
    if chans == 2:
        assert np.allclose(result.images[..., 0], result.images[..., 2])  # the grey band, shown as grey
    wide = timm.create_model('v_jetmoe_tiny', in_chans=5, **kwargs).eval()
    with pytest.raises(ValueError, match=r'at most 4 channels, the model takes 5: pass the images as one '
                                         r'\(B, 5, H, W\) tensor to inspect_routing\(model, images\) in Python'):
        inspect_routing(wide, [path])
    assert inspect_routing(wide, torch.randn(1, 5, 32, 32)).images.shape == (1, 32, 32, 3)


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path, tiny_vit_kwargs):
    """16-bit grey files (PNG opens as 'I;16', PGM as 'I') reach the model as the same image in 8 bits; PIL's own
    convert clips them at 255 (all white)."""
    grey16 = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    grey8 = np.round(grey16 / 257).astype(np.uint8)
    paths = [tmp_path / 'grey16.png', tmp_path / 'grey16.pgm', tmp_path / 'grey8.png']
    Image.fromarray(grey16).save(paths[0])
    Image.fromarray(grey16).save(paths[1])
    Image.fromarray(grey8).save(paths[2])
    assert [Image.open(p).mode for p in paths] == ['I;16', 'I', 'L']
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)
    images = inspect_routing(model, paths + [Image.fromarray(grey16)]).images
    for i in range(len(images)):
        assert np.allclose(images[i], images[2], atol=1e-6)
    assert 0.4 < images[0].mean() < 0.6
    # an 8-bit image widened to 'I' (values 0..255) is no 16-bit one: taken as it is, not darkened 257 times
    widened = Image.fromarray(grey8).convert('I')
    Image.fromarray(grey8.astype(np.int32)).save(tmp_path / 'int32.tif')  # a 32-bit TIFF of 8-bit values
    assert Image.open(tmp_path / 'int32.tif').mode == 'I'
    for image in inspect_routing(model, [widened, tmp_path / 'int32.tif']).images:
        assert np.allclose(image, images[2], atol=1e-6)
    # a dark 16-bit file (values up to 255 of 65535) stays dark, as a PGM as well as a PNG
    dark = (grey16 // 257).astype(np.uint16)
    Image.fromarray(dark).save(tmp_path / 'dark.pgm')
    Image.fromarray(dark).save(tmp_path / 'dark.png')
    assert all(image.max() < 0.01 for image in inspect_routing(model, [tmp_path / 'dark.pgm',
                                                                       tmp_path / 'dark.png']).images)


def _no_model(monkeypatch):
    """Make building the model fail loudly: an input mistake must be named before it."""
    def fail(*args, **kwargs):
        raise AssertionError('the model was built before the inputs were checked')
    monkeypatch.setattr('jetmoe_timm.tools.visualize._create_model', fail)


@needs_matplotlib
@pytest.mark.parametrize('single', [['num_univ_experts=0', 'routing=softmoe'], ['num_core_experts=0']])
def test_cli_inspect_single_path_models(tmp_path, single, capsys):
    """A layer with experts on one path only: no top expert of the other path, and no crash after the files."""
    images = _write_images(tmp_path, n=2)
    out = tmp_path / 'out'
    assert cli.main(['inspect', 'v_jetmoe_tiny', *images, '--out', str(out), '--model-kwargs', *TINY_ARGS,
                     *single]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert 'wrote 4 files' in printed.out
    assert printed.err.count('note: random init') == 1
    empty = 'univ' if 'num_univ_experts=0' in single else 'core'
    data = json.loads((out / 'routing.json').read_text())
    for layer in data['layers'].values():
        assert all(top[empty] == [] and len(top[{'univ': 'core', 'core': 'univ'}[empty]]) == 3
                   for top in layer['top_experts'])
    assert f'most often top: {"core" if empty == "univ" else "univ"} ' in printed.out


def test_cli_inspect_model_kwargs_before_the_images(tmp_path, capsys):
    images = _write_images(tmp_path, n=2)
    out = str(tmp_path / 'o')
    with pytest.raises(SystemExit) as e:  # --model-kwargs took the images: argparse finds none
        cli.main(['inspect', 'v_jetmoe_tiny', '--model-kwargs', *TINY_ARGS, *images, '--out', out])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    took = ', '.join(repr(str(i)) for i in images)  # named, as docs/inspect.md says
    assert lines == [f'jetmoe-timm inspect: error: the following arguments are required: images; --model-kwargs '
                     f'took {took}, which is no K=V: put --model-kwargs after the positional arguments (see '
                     f'jetmoe-timm inspect --help)']
    with pytest.raises(SystemExit) as e:  # no images at all, and no --model-kwargs: argparse's own words
        cli.main(['inspect', 'v_jetmoe_tiny', '--out', out])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'the following arguments are required: images' in err and 'model-kwargs' not in err.splitlines()[-1]
    # it took the second image: named, with the same fix
    assert cli.main(['inspect', 'v_jetmoe_tiny', images[0], '--model-kwargs', *TINY_ARGS, images[1],
                     '--out', out]) == 2
    err = capsys.readouterr().err
    assert f"took '{images[1]}'" in err and 'put --model-kwargs after the images' in err
    assert cli.main(['inspect', 'v_jetmoe_tiny', *images, '--out', out, '--model-kwargs', 'num_classes']) == 2
    assert "'num_classes' is not of the form key=value" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


TINY_VIT_SMALLEST = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_core_experts=2,
                         num_univ_experts=2, moe_blocks=[1])


def test_cli_inspect_checks_images_before_building_the_model(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    images = _write_images(tmp_path, n=1)
    good = open(images[0], 'rb').read()
    (tmp_path / 'trunc.png').write_bytes(good[:len(good) // 2])  # PIL opens it; decoding it fails
    (tmp_path / 'text.jpg').write_text('not an image')
    (tmp_path / 'pictures').mkdir()
    cases = [
        (str(tmp_path / 'missing.jpg'), 'Image not found'),
        (str(tmp_path / 'pictures'), 'is a folder, not an image: pass image files'),
        (str(tmp_path / 'trunc.png'), f'Cannot read image {tmp_path / "trunc.png"}: image file is truncated'),
        (str(tmp_path / 'text.jpg'), f'Cannot read image {tmp_path / "text.jpg"}: not an image format'),
    ]
    for bad, message in cases:  # without --model-kwargs too: no model built first, no random-init note
        for kwargs in ([], ['--model-kwargs', *TINY_ARGS]):
            assert cli.main(['inspect', 'v_jetmoe_tiny', *images, bad, '--out', str(tmp_path / 'o'), *kwargs]) == 2
            err = capsys.readouterr().err
            assert message in err and 'random init' not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'o').exists()
    model = timm.create_model('v_jetmoe_tiny', **TINY_VIT_SMALLEST)
    with pytest.raises(ValueError, match='Cannot read image .*trunc.png: image file is truncated'):
        inspect_routing(model, [str(tmp_path / 'trunc.png')])  # the Python API says the same


def test_cli_inspect_checkpoint_folder_mistakes(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    images = _write_images(tmp_path, n=1)
    folders = {}
    for name, config in [('dense', '{"architecture": "vit_small_patch16_224"}'), ('noarch', '{"model_type": "vit"}'),
                         ('notjson', 'not json'), ('noweights', '{"architecture": "v_jetmoe_tiny"}')]:
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / 'config.json').write_text(config)
        if name != 'noweights':
            save_safetensors_atomic({'x': torch.zeros(1)}, folders[name] / 'model.safetensors')
    cases = [
        (folders['dense'], f"holds a dense 'vit_small_patch16_224', not a JetMoE model: convert it first "
                           f"(jetmoe-timm convert v_jetmoe_tiny --predecessor local-dir:{folders['dense']} "),
        (folders['noarch'], "config.json names no 'architecture'"),
        (folders['notjson'], f"{folders['notjson'] / 'config.json'} is not valid JSON (Expecting value"),
        (folders['noweights'], 'has no weights (model.safetensors)'),
        (folders['dense'] / 'config.json', 'is a JSON file, not a weights file: pass the folder'),
        (tmp_path / 'cut.safetensors', 'Refusing to load damaged weights'),
    ]
    good = (folders['dense'] / 'model.safetensors').read_bytes()
    (tmp_path / 'cut.safetensors').write_bytes(good[:len(good) - 2])
    for checkpoint, message in cases:
        assert cli.main(['inspect', 'v_jetmoe_tiny', *images, '--checkpoint', str(checkpoint),
                         '--out', str(tmp_path / 'o')]) == 2
        err = capsys.readouterr().err
        assert message in err and 'None' not in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.undo()  # what only loading tells: a .pth that is no checkpoint, or holds more than tensors
    (tmp_path / 'text.pth').write_text('not a pickle')
    torch.save({'state_dict': {}, 'when': __import__('datetime').date(2025, 1, 1)}, tmp_path / 'objects.pth')
    (tmp_path / 'empty.pth').write_bytes(b'')
    for name, message in (('text.pth', 'is no PyTorch checkpoint'), ('empty.pth', 'is no PyTorch checkpoint'),
                          ('objects.pth', 'holds Python objects besides tensors (datetime.date)')):
        assert cli.main(['inspect', 'v_jetmoe_tiny', *images, '--checkpoint', str(tmp_path / name),
                         '--out', str(tmp_path / 'o'), '--model-kwargs', *TINY_ARGS]) == 2
        err = capsys.readouterr().err
        assert message in err and 'weights_only' not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'o').exists()


def test_dynamic_img_size_vit_is_inspected_at_its_img_size(tmp_path, tiny_vit_kwargs):
    images = _write_images(tmp_path, n=1)
    for img_size, grid in ((32, (8, 8)), ((32, 48), (8, 12))):
        model = timm.create_model('v_jetmoe_tiny', **dict(tiny_vit_kwargs, img_size=img_size, dynamic_img_size=True))
        result = inspect_routing(model, images)
        assert result.info['input_size'] == [3, *model.patch_embed.img_size]
        assert {lr.grid for lr in result.layers.values()} == {grid}


def test_images_with_the_same_name_get_different_labels(tmp_path, tiny_vit_kwargs):
    from jetmoe_timm.tools.visualize import _short
    for folder in ('a', 'b'):
        (tmp_path / folder).mkdir()
        _write_images(tmp_path / folder, n=1)
    paths = [str(tmp_path / 'a' / 'img0.png'), str(tmp_path / 'b' / 'img0.png')]
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)
    assert inspect_routing(model, paths).names == ['a/img0.png', 'b/img0.png']
    assert inspect_routing(model, [paths[0], paths[0]]).names == ['img0.png', 'img0.png (2)']
    assert inspect_routing(model, [paths[0], str(tmp_path / 'b' / '..' / 'a' / 'img0.png')]).names == [
        'img0.png', 'img0.png (2)']  # the same file, spelt two ways
    # figure titles keep both ends of a long label: its folder and the number before the extension
    assert _short('holiday/photo_of_the_beach_1.jpg') != _short('holiday/photo_of_the_beach_2.jpg')
    assert len(_short('holiday/photo_of_the_beach_1.jpg')) == 24 and _short('short.png') == 'short.png'


def test_cli_inspect_unknown_or_dense_model(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    images = _write_images(tmp_path, n=1)
    out = str(tmp_path / 'o')
    assert cli.main(['inspect', 'v_jetmoe_tinyy', *images, '--out', out]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'v_jetmoe_tinyy' (did you mean 'v_jetmoe_tiny'?): pick one of [" in err
    assert "'c_jetmoe_femto'" in err
    assert cli.main(['inspect', 'vit_small_patch16_224', *images, '--out', out]) == 2
    assert "'vit_small_patch16_224' is a dense timm model" in capsys.readouterr().err
    assert not (tmp_path / 'o').exists()


def test_cli_inspect_pretrained_offline_names_the_cli_way_out(tmp_path, monkeypatch, capsys):
    """Offline with nothing cached: the one line offers --checkpoint, the flag inspect takes, not the Python API's
    pretrained_cfg_overlay."""
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('JETMOE_TIMM_PREDECESSOR', raising=False)
    images = _write_images(tmp_path, n=1)
    assert cli.main(['inspect', 'v_jetmoe_tiny', *images, '--pretrained', '--out', str(tmp_path / 'o'),
                     '--model-kwargs', *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'HF_HUB_OFFLINE is set' in err[0] and 'or pass --checkpoint with converted weights' in \
        err[0] and 'pretrained_cfg_overlay' not in err[0], err
    assert not (tmp_path / 'o').exists()
