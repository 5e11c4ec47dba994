"""Checkpoint recycling: the recycled weights are the predecessor's, index by index, for every method."""
import os
import re
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config
from timm.models import save_for_hf

from jetmoe_timm.export import read_provenance
from jetmoe_timm.recycle import METHODS, recycle
from jetmoe_timm.recycle.selection import partition_graph, weighted_sample, make_generator

PRED_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
SUCC_KWARGS = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4,
                   num_univ_experts=6, num_classes=10)


def _randomize(model):
    """Every tensor distinct and non-trivial, so that index checks cannot pass by accident."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope='module')
def predecessor():
    torch.manual_seed(0)
    return _randomize(timm.create_model('vit_small_patch16_224', **PRED_KWARGS)).eval()


def _successor(**kwargs):
    torch.manual_seed(1)
    return timm.create_model('v_jetmoe_tiny', **dict(SUCC_KWARGS, **kwargs))


def _recycle(pred, method='importance', succ=None, **kwargs):
    succ = succ or _successor()
    kwargs.setdefault('num_calib', 16)
    kwargs.setdefault('batch_size', 8)
    result = recycle(succ, pred, method=method, progress=False, **kwargs)
    # filled in place: the result's tensors are the successor's own, none shares memory with the predecessor
    assert result.model is succ and result.state_dict.keys() == succ.state_dict().keys()
    assert all(result.state_dict[k].data_ptr() == v.data_ptr() for k, v in succ.state_dict().items())
    assert not {v.untyped_storage().data_ptr() for v in succ.state_dict().values()} & {
        v.untyped_storage().data_ptr() for v in pred.state_dict().values()}
    return succ, result


@pytest.mark.parametrize('method', METHODS)
def test_every_method_matches_predecessor_index_by_index(predecessor, method):
    succ, r = _recycle(predecessor, method)
    P, S, sel = predecessor.state_dict(), succ.state_dict(), r.selection
    ch = sel['channels']
    assert ch.numel() == 32 and torch.equal(ch, ch.sort().values) and ch.unique().numel() == 32
    torch.testing.assert_close(S['cls_token'], P['cls_token'][..., ch], rtol=0, atol=0)
    torch.testing.assert_close(S['pos_embed'], P['pos_embed'][..., ch], rtol=0, atol=0)
    torch.testing.assert_close(S['patch_embed.proj.weight'], P['patch_embed.proj.weight'][ch], rtol=0, atol=0)
    torch.testing.assert_close(S['fc_norm.weight'], P['norm.weight'][ch], rtol=0, atol=0)
    hd = 16
    for i in range(4):
        b = f'blocks.{i}'
        # the same channel indices in every layer
        for n in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'attn.proj.bias'):
            assert torch.equal(S[f'{b}.{n}'], P[f'{b}.{n}'][ch]), (b, n)
        # whole heads, q / k / v alike
        heads, dims = sel[f'{b}.heads'], sel[f'{b}.attn_dims']
        assert heads.numel() == 2 and torch.equal(dims, (heads[:, None] * hd + torch.arange(hd)).flatten())
        qkv = P[f'{b}.attn.qkv.weight'].view(3, 64, 64)
        assert torch.equal(S[f'{b}.attn.qkv.weight'].view(3, 32, 32), qkv[:, dims][:, :, ch])
        assert torch.equal(S[f'{b}.attn.qkv.bias'].view(3, 32), P[f'{b}.attn.qkv.bias'].view(3, 64)[:, dims])
        assert torch.equal(S[f'{b}.attn.proj.weight'], P[f'{b}.attn.proj.weight'][ch][:, dims])
        if i < 2:  # dense blocks
            n = sel[f'{b}.mlp']
            assert torch.equal(S[f'{b}.mlp.fc1.weight'], P[f'{b}.mlp.fc1.weight'][n][:, ch])
            assert torch.equal(S[f'{b}.mlp.fc2.weight'], P[f'{b}.mlp.fc2.weight'][ch][:, n])
            continue
        for path, E, h in (('core', 4, 128), ('univ', 6, 32)):
            neurons = sel[f'{b}.{path}_neurons']
            assert neurons.shape == (E, h)
            assert all(row.unique().numel() == h for row in neurons), 'an expert repeats a neuron'
            pre = f'{b}.mlp.{path}_experts'
            for e in range(E):
                n = neurons[e]
                assert torch.equal(S[f'{pre}.fc1.weight'][e], P[f'{b}.mlp.fc1.weight'][n][:, ch].t())
                assert torch.equal(S[f'{pre}.fc1.bias'][e], P[f'{b}.mlp.fc1.bias'][n])
                assert torch.equal(S[f'{pre}.fc2.weight'][e], P[f'{b}.mlp.fc2.weight'][ch][:, n].t())
                assert torch.equal(S[f'{pre}.fc2.bias'][e], P[f'{b}.mlp.fc2.bias'][ch])
    # router parameters and the head (token pool vs avg pool) keep the successor's own init
    assert 'blocks.2.mlp.slot_query' in r.fresh_keys and 'head.weight' in r.fresh_keys
    assert r.provenance['method'] == method


def test_method_specifics(predecessor):
    # copy with universal experts wider than the core ones (univ_ratio 2): they take the top neurons instead
    _, wide = _recycle(predecessor, 'copy', succ=_successor(core_hidden=64, univ_ratio=2.))
    rows = wide.selection['blocks.3.univ_neurons']
    assert rows.shape == (6, 128) and rows[0].unique().numel() == 128 and all(torch.equal(rows[0], r) for r in rows)
    _, imp = _recycle(predecessor, 'importance')
    _, cp = _recycle(predecessor, 'copy')
    _, uni = _recycle(predecessor, 'uniform')
    _, gr = _recycle(predecessor, 'graph')
    # importance: experts differ from each other; copy / uniform: all experts identical
    assert not torch.equal(imp.selection['blocks.3.core_neurons'][0], imp.selection['blocks.3.core_neurons'][1])
    for r in (cp, uni):
        core = r.selection['blocks.3.core_neurons']
        assert all(torch.equal(core[0], row) for row in core)
    # copy: universal experts are an evenly strided subset of the core expert
    assert set(cp.selection['blocks.3.univ_neurons'][0].tolist()) <= set(cp.selection['blocks.3.core_neurons'][0].tolist())
    # graph: a partition (every neuron in exactly one part), experts made of whole parts but the last one
    parts = gr.selection['blocks.3.graph_parts']
    assert parts.shape == (256,) and parts.min() == 0
    for row in gr.selection['blocks.3.core_neurons']:
        used = parts[row]
        partial = [p for p in used.unique() if (used == p).sum() != (parts == p).sum()]
        assert len(partial) <= 1


def test_statistics_are_what_they_say_over_more_rows_than_one_chunk():
    """l2 (root mean square), l1 (mean |x|), freq (share of x > 0) and co-activation counts of a module's input and
    output, accumulated in float64 over batches and row chunks, equal the same figures computed at once."""
    from jetmoe_timm.recycle.stats import STATISTICS, Probe, collect_statistics
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU())
    batches = [torch.randn(4, 300, 6), torch.randn(3, 300, 6)]  # 2100 rows: three chunks of at most 1024
    stats = collect_statistics(model, [Probe('0', on_input=True), Probe('1', coact=True)], batches)
    with torch.no_grad():
        seen = {'0': torch.cat(batches).double(), '1': model(torch.cat(batches)).double()}
    for module, x in seen.items():
        x = x.reshape(-1, x.shape[-1])
        want = dict(l2=x.pow(2).mean(0).sqrt(), l1=x.abs().mean(0), freq=(x > 0).double().mean(0))
        assert set(want) == set(STATISTICS)
        for statistic in STATISTICS:
            torch.testing.assert_close(stats[module, statistic], want[statistic], rtol=1e-6, atol=1e-9)
    pos = (seen['1'].reshape(-1, 5) > 0).double()
    assert torch.equal(stats.coact('1'), pos.t() @ pos)
    assert stats.num_images == 7
    with pytest.raises(KeyError, match='no co-activation'):
        stats.coact('0')


@pytest.mark.parametrize('statistic', ['l1', 'freq'])
def test_every_statistic_drives_the_selection(predecessor, statistic):
    """Another statistic ranks the channels and weighs the neurons experts sample otherwise, and the provenance says
    which was used."""
    _, l2 = _recycle(predecessor, 'importance')
    _, other = _recycle(predecessor, 'importance', statistic=statistic)
    assert other.provenance['statistic'] == statistic and l2.provenance['statistic'] == 'l2'
    assert not torch.equal(other.selection['channels'], l2.selection['channels'])
    assert not torch.equal(other.selection['blocks.3.core_neurons'], l2.selection['blocks.3.core_neurons'])


def test_deterministic_by_seed(predecessor):
    _, a = _recycle(predecessor, 'importance', seed=3)
    _, b = _recycle(predecessor, 'importance', seed=3)
    _, c = _recycle(predecessor, 'importance', seed=4)
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert not torch.equal(a.selection['blocks.3.core_neurons'], c.selection['blocks.3.core_neurons'])
    _, g1 = _recycle(predecessor, 'graph', seed=5)
    _, g2 = _recycle(predecessor, 'graph', seed=5)
    assert torch.equal(g1.selection['blocks.3.core_neurons'], g2.selection['blocks.3.core_neurons'])


def test_resampled_grid_and_narrow_heads(predecessor):
    succ = _successor(img_size=48)
    succ, _ = _recycle(predecessor, succ=succ)
    assert succ.pos_embed.shape == (1, 1 + 12 * 12, 32)
    succ = _successor(patch_size=8, img_size=32, num_heads=4)  # head_dim 8 < 16: top dims within each head
    succ, r = _recycle(predecessor, succ=succ)
    dims = r.selection['blocks.0.attn_dims'].view(4, 8)
    assert torch.equal(dims % 16, dims[:1].expand(4, 8) % 16)  # the same dims in every head
    assert succ.patch_embed.proj.weight.shape == (32, 3, 8, 8)


@pytest.mark.parametrize('qk_norm', [False, True])
def test_narrower_heads_keep_the_attention_temperature(qk_norm):
    """Heads of 6 dims from heads of 12: the successor divides q.k by sqrt(6) where the predecessor divided by
    sqrt(12), so its queries (their rows of qkv, or q_norm) are scaled by sqrt(6 / 12). Oracle (without qk_norm): a
    predecessor whose dropped dims are dead (zero q, k, v rows) computes its attention from the kept dims alone;
    the recycled attention computes the same."""
    d, h, hd = 48, 4, 12
    torch.manual_seed(0)
    pred = _randomize(timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, embed_dim=d, depth=2,
                                        num_heads=h, qk_norm=qk_norm, num_classes=7)).eval()
    with torch.no_grad():
        for blk in pred.blocks:
            for k in range(3):
                for j in range(h):
                    dead = slice(k * d + j * hd + hd // 2, k * d + (j + 1) * hd)
                    blk.attn.qkv.weight[dead] = 0
                    blk.attn.qkv.bias[dead] = 0
    succ = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=h,
                             qk_norm=qk_norm, moe_blocks=(), num_classes=7)
    succ, r = _recycle(pred, succ=succ, measure_retention=False)
    assert torch.equal(r.selection['blocks.0.attn_dims'].view(h, hd // 2) % hd, torch.arange(hd // 2).expand(h, -1))
    ch, s = r.selection['channels'], (6 / 12) ** 0.5
    if qk_norm:  # the norm carries the scale (its statistics over 6 dims differ from those over 12: no oracle)
        a, b = succ.blocks[0].attn, pred.blocks[0].attn
        torch.testing.assert_close(a.q_norm.weight, b.q_norm.weight[:hd // 2] * s)
        torch.testing.assert_close(a.q_norm.bias, b.q_norm.bias[:hd // 2] * s)
        assert torch.equal(a.k_norm.weight, b.k_norm.weight[:hd // 2])
        rows = torch.cat([r.selection['blocks.0.attn_dims'] + k * d for k in range(3)])
        assert torch.equal(a.qkv.weight, b.qkv.weight[rows][:, ch])  # q unscaled: q_norm scales it
        return
    x = torch.zeros(2, 5, d)
    x[..., ch] = torch.randn(2, 5, len(ch))
    with torch.no_grad():
        torch.testing.assert_close(succ.eval().blocks[0].attn(x[..., ch]), pred.blocks[0].attn(x)[..., ch])


def test_official_recipe(predecessor):
    torch.manual_seed(2)
    body = _randomize(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=32,
                                        depth=4, num_heads=2, num_classes=10))
    succ, r = _recycle(predecessor, recipe='official', body_predecessor=body)
    B, S, P = body.state_dict(), succ.state_dict(), predecessor.state_dict()
    for k in ('blocks.0.mlp.fc1.weight', 'blocks.3.attn.qkv.weight', 'blocks.3.norm2.weight', 'pos_embed'):
        assert torch.equal(S[k], B[k]), k  # body verbatim
    chx, n = r.selection['blocks.3.core_channels'], r.selection['blocks.3.core_neurons']
    assert chx.shape == (4, 32)
    for e in range(4):  # experts from the large predecessor, each with its own channels
        assert torch.equal(S['blocks.3.mlp.core_experts.fc1.weight'][e], P['blocks.3.mlp.fc1.weight'][n[e]][:, chx[e]].t())
        assert torch.equal(S['blocks.3.mlp.core_experts.fc2.bias'][e], P['blocks.3.mlp.fc2.bias'][chx[e]])
    with pytest.raises(ValueError, match='body_predecessor'):
        recycle(_successor(), predecessor, recipe='official', calib='weights', progress=False)
    # a body whose layers the successor has no place for (qk-norm): refused, as the paper recipe refuses them
    normed = _randomize(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, embed_dim=32, depth=4,
                                          num_heads=2, num_classes=10, qk_norm=True))
    with pytest.raises(ValueError, match=r'no place for 16 body_predecessor tensor\(s\), e.g. blocks.0.attn.q_norm'):
        recycle(_successor(), predecessor, recipe='official', body_predecessor=normed, progress=False)


def test_calibration_sources(predecessor, tmp_path):
    for i in range(6):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / f'img{i}.png')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    with pytest.warns(UserWarning, match='cannot be decoded'):
        _, r = _recycle(predecessor, calib=str(tmp_path), num_calib=7)
    assert r.provenance['calibration_images'] == 6
    _, r = _recycle(predecessor, calib='weights')
    assert r.provenance['calibration'] == 'weights'
    with pytest.raises(FileNotFoundError, match='does not exist'):
        _recycle(predecessor, calib=str(tmp_path / 'missing'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match='holds no images'):
        _recycle(predecessor, calib=str(empty))


def test_calibration_from_datasets_and_loaders_of_every_shape(predecessor):
    """Calibration images from a Dataset of bare images or of (image, label) pairs, and from DataLoaders batched
    or not (batch_size=None): every source gives the same images, hence the same selection."""
    images = [torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(6)]

    class Bare(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i]
    labelled = torch.utils.data.TensorDataset(torch.stack(images), torch.arange(6))
    sources = {'bare dataset': Bare(), 'labelled dataset': labelled,
               'batched loader': torch.utils.data.DataLoader(labelled, batch_size=4),
               'unbatched loader': torch.utils.data.DataLoader(Bare(), batch_size=None)}
    selections = {}
    for name, calib in sources.items():
        _, r = _recycle(predecessor, calib=calib, num_calib=6, measure_retention=False)
        assert r.provenance['calibration_images'] == 6, name
        selections[name] = r.selection
    first = selections['bare dataset']
    assert all(all(torch.equal(sel[k], first[k]) for k in first) for sel in selections.values())


def test_bf16_predecessor_and_successor(predecessor):
    """Calibration images reach a bfloat16 model in its own dtype (statistics and the retention figure)."""
    pred = timm.create_model('vit_small_patch16_224', **PRED_KWARGS).eval()
    pred.load_state_dict(predecessor.state_dict())
    succ, r = _recycle(pred.to(torch.bfloat16), succ=_successor().to(torch.bfloat16), calib='synthetic')
    assert 0 < r.provenance['retention']['cka'] <= 1
    assert torch.equal(succ.patch_embed.proj.weight, pred.patch_embed.proj.weight[r.selection['channels']])


def test_unpooled_successor_gets_a_retention_figure(predecessor):
    """global_pool='' (timm's call for unpooled features): the figure averages the successor's tokens."""
    succ, r = _recycle(predecessor, succ=_successor(global_pool='', num_classes=0))
    assert 0 < r.provenance['retention']['cka'] <= 1 and r.provenance['retention']['features'] == 32


def test_a_builds_note_and_provenance_say_what_its_classifier_is(pred_dir):
    """The predecessor's classifier (same classes and pooling), a fresh one, or none: the cfg's note and the
    provenance say which (the note said 'No classifier' for all three)."""
    from jetmoe_timm.recycle.build import build_recycled
    kwargs = {k: v for k, v in SUCC_KWARGS.items() if k != 'num_classes'}
    for extra, classifier, note in ((dict(num_classes=10, global_pool='token'), 'taken',
                                     "The predecessor's classifier (same classes and pooling)"),
                                    (dict(num_classes=5), 'fresh', 'A freshly initialised classifier'),
                                    (dict(num_classes=0), 'none', 'No classifier')):
        succ, r = build_recycled('v_jetmoe_tiny', dict(kwargs, **extra), predecessor=f'local-dir:{pred_dir}',
                                 calib='weights', measure_retention=False, progress=False)
        assert r.provenance['classifier'] == classifier and f'{note}; fine-tune before use.' in succ.pretrained_cfg[
            'notes'][0], extra
        assert ('head.weight' in r.fresh_keys) == (classifier == 'fresh')


def test_head_is_copied_only_with_the_norm_on_the_same_side_of_the_pooling(predecessor):
    """An average-pooling predecessor that norms before pooling (fc_norm=False, timm's *_gap_* ViTs) into a successor
    that norms after it (fc_norm, the default for average pooling): the head would read other features, so it is
    left fresh; with the norm where the predecessor has it, it is copied."""
    pred = _randomize(timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, global_pool='avg', fc_norm=False)))
    for fc_norm, copied in ((None, False), (False, True)):
        succ, r = _recycle(pred.eval(), succ=_successor(global_pool='avg', fc_norm=fc_norm), calib='weights',
                           measure_retention=False)
        assert ('head.weight' not in r.fresh_keys) == copied, fc_norm


def test_non_finite_predecessor_is_refused(predecessor):
    pred = timm.create_model('vit_small_patch16_224', **PRED_KWARGS).eval()
    pred.load_state_dict(predecessor.state_dict())
    with torch.no_grad():
        pred.blocks[0].mlp.fc2.weight[3, 5] = float('nan')
    with pytest.raises(ValueError, match="'blocks.0.mlp.fc2.weight' holds NaN or infinite values"):
        _recycle(pred)


@pytest.mark.parametrize('source', ['synthetic', 'folder'])
def test_calibration_feeds_single_channel_models(tmp_path, source):
    """A grey-scale predecessor (in_chans=1) gets 1-channel calibration images, normalised with one mean / std."""
    from jetmoe_timm.recycle.calibration import calibration_batches
    torch.manual_seed(0)
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, in_chans=1)).eval()
    if source == 'folder':
        for i in range(3):
            Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / f'img{i}.png')
        source = str(tmp_path)
    batches, total, _ = calibration_batches(source, pred, num_images=3, batch_size=2)
    shapes = [b.shape for b in batches]
    assert total == 2 and shapes == [(2, 1, 32, 32), (1, 1, 32, 32)]
    succ, r = _recycle(pred, succ=_successor(in_chans=1), calib=source, num_calib=3)
    assert torch.equal(succ.patch_embed.proj.weight, pred.patch_embed.proj.weight[r.selection['channels']])


@pytest.mark.parametrize('chans', [4, 5])
def test_calibration_feeds_multichannel_models(tmp_path, chans):
    """A predecessor of more channels (RGB + near-infrared, multispectral) gets calibration images of its channels:
    synthetic ones drawn in all of them, 4-band image files as they are (CMYK-tagged TIFFs band for band), RGB
    files with a warning, more than 4 channels from files refused in one line; recycling and its retention figure
    run with calib='weights' too (it failed in retention, the images being RGB)."""
    from jetmoe_timm.recycle.calibration import calibration_batches
    torch.manual_seed(0)
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, in_chans=chans)).eval()
    (batch,) = calibration_batches('synthetic', pred, num_images=3, batch_size=3)[0]
    assert batch.shape == (3, chans, 32, 32)
    assert all(batch[:, c].std() > 0.1 for c in range(chans))  # every channel carries an image
    if chans == 4:
        for i in range(2):
            bands = (torch.rand(40, 40, 4) * 255).byte().numpy()
            Image.fromarray(bands, 'RGBA').save(tmp_path / f'rgba{i}.png')
        Image.fromarray(bands, 'CMYK').save(tmp_path / 'cmyk.tif')
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # 4-band files: nothing filled
            (batch,) = calibration_batches(tmp_path, pred, num_images=3, batch_size=3)[0]
        assert batch.shape == (3, 4, 32, 32)
        # the bands are resampled each on their own: PIL premultiplies RGB by the alpha slot a 4th band sits in
        flat = np.zeros((40, 40, 4), np.uint8)
        flat[..., :3] = 200  # RGB 200 everywhere, the 4th band 0
        (tmp_path / 'nir0').mkdir()
        Image.fromarray(flat, 'RGBA').save(tmp_path / 'nir0' / 'flat.png')
        (flat_batch,) = calibration_batches(tmp_path / 'nir0', pred, num_images=1, batch_size=1)[0]
        cfg = resolve_data_config({}, model=pred)
        for c in range(3):
            assert torch.allclose(flat_batch[0, c], torch.tensor((200 / 255 - cfg['mean'][c]) / cfg['std'][c]))
        Image.fromarray(bands[..., :3], 'RGB').save(tmp_path / 'rgb.png')
        with pytest.warns(UserWarning, match=r'1 calibration image\(s\) had no band of their own for the last of '
                                             r'the 4 channels the model takes: it is an opaque alpha band'):
            list(calibration_batches(tmp_path, pred, num_images=4, batch_size=4)[0])
    else:
        Image.new('RGB', (8, 8)).save(tmp_path / 'rgb.png')
        with pytest.raises(ValueError, match='image files hold at most 4 channels, the model takes 5: calibrate with '
                                             r'synthetic images \(--calib synthetic\)'):
            calibration_batches(tmp_path, pred, num_images=1, batch_size=1)
    for calib in ('synthetic', 'weights'):
        succ, r = _recycle(pred, succ=_successor(in_chans=chans), calib=calib, num_calib=4)
        assert torch.equal(succ.patch_embed.proj.weight, pred.patch_embed.proj.weight[r.selection['channels']])
        assert 0 <= r.provenance['retention']['cka'] <= 1



def test_calibration_reads_images_as_they_are_meant(tmp_path):
    """16-bit grey and 0..1 float images are scaled to 8 bits (PIL's convert clips at 255: white, or black for the
    float ones), in a folder and as a Dataset's PIL images, which also keep a 4th band as a folder's file does;
    integer tensors (pixel values) are refused; linked folders are walked; a folder with fewer images than asked
    for is said, its description giving what it had; an RGB file read for a 2-channel model is said to have no
    band of its own for the second."""
    from jetmoe_timm.recycle.calibration import calibration_batches, list_images

    class Images(torch.utils.data.Dataset):  # a Dataset that gives PIL images
        def __init__(self, *images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.images[i]
    grey = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, in_chans=1)).eval()
    files = {'8bit.png': Image.fromarray(np.full((40, 40), 117, np.uint8)),
             '16bit.png': Image.fromarray(np.full((40, 40), 30000, np.uint16)),  # 30000 / 257 = 116.7
             'float.tif': Image.fromarray(np.full((40, 40), 117 / 255, np.float32), 'F')}
    batches = {}
    for name, im in files.items():
        (tmp_path / name).mkdir()
        im.save(tmp_path / name / name)
        batches[name] = next(calibration_batches(tmp_path / name, grey, num_images=1, batch_size=1)[0])
        dataset = next(calibration_batches(Images(Image.open(tmp_path / name / name)), grey, num_images=1,
                                           batch_size=1)[0])
        assert torch.equal(dataset, batches[name]), name
    assert torch.equal(batches['16bit.png'], batches['8bit.png']) and torch.equal(batches['float.tif'],
                                                                                  batches['8bit.png'])
    four = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, in_chans=4)).eval()
    flat = np.zeros((40, 40, 4), np.uint8)
    flat[..., :3] = 200  # RGB 200, the 4th band 0: PIL's RGBA resampling would premultiply the RGB away
    (tmp_path / 'nir').mkdir()
    Image.fromarray(flat, 'RGBA').save(tmp_path / 'nir' / 'flat.png')
    from_folder = next(calibration_batches(tmp_path / 'nir', four, num_images=1, batch_size=1)[0])
    from_dataset = next(calibration_batches(Images(Image.fromarray(flat, 'RGBA')), four, num_images=1,
                                            batch_size=1)[0])
    assert torch.equal(from_dataset, from_folder) and from_folder[0, 0].min() > 0
    pixels = torch.utils.data.TensorDataset(torch.full((2, 3, 32, 32), 117, dtype=torch.uint8))
    with pytest.raises(ValueError, match='calibration tensors are taken as normalised model inputs, got torch.uint8'):
        list(calibration_batches(pixels, timm.create_model('vit_small_patch16_224', **PRED_KWARGS), num_images=2)[0])
    (tmp_path / 'linked').mkdir()  # a folder assembled from links to others, one of them a loop
    (tmp_path / 'linked' / 'grey').symlink_to(tmp_path / '8bit.png')
    (tmp_path / 'linked' / 'again').symlink_to(tmp_path / 'linked')
    assert [p.name for p in list_images(tmp_path / 'linked').files] == ['8bit.png']
    with pytest.warns(UserWarning, match="calibration took 1 images from .*linked', fewer than the 5 asked for"):
        batches, total, description = calibration_batches(tmp_path / 'linked', grey, num_images=5, batch_size=4)
        assert len(list(batches)) == total == 1 and description == 'folder:linked:1'
    two = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, in_chans=2)).eval()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(tmp_path / 'nir' / 'flat.png')
    with pytest.warns(UserWarning, match='had no band of their own for the last of the 2 channels'):
        list(calibration_batches(tmp_path / 'nir', two, num_images=1, batch_size=1)[0])


def test_ready_tensors_take_the_size_a_vit_was_built_for():
    """Tensors from a Dataset are resized to the one size a fixed-size model takes: a predecessor built at 64 px
    (its cfg says 32) gets 64 px calibration batches (the demo's higher-resolution predecessor)."""
    from jetmoe_timm.recycle.calibration import calibration_batches
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, img_size=64))
    data = torch.utils.data.TensorDataset(torch.randn(3, 3, 32, 32))
    (batch,) = calibration_batches(data, pred, num_images=3, batch_size=3)[0]
    assert batch.shape == (3, 3, 64, 64)

def test_bad_requests_name_the_fix(predecessor):
    with pytest.raises(ValueError, match='exceeds the predecessor width'):
        recycle(_successor(embed_dim=128, num_heads=4), predecessor, progress=False)
    with pytest.raises(ValueError, match='attention heads'):
        recycle(_successor(num_heads=8, embed_dim=32, patch_size=4), predecessor, progress=False)
    with pytest.raises(ValueError, match="Unknown method 'best'"):
        recycle(_successor(), predecessor, method='best', progress=False)
    with pytest.raises(ValueError, match="Unknown recipe"):
        recycle(_successor(), predecessor, recipe='mine', progress=False)
    convnext = timm.create_model('convnext_atto', num_classes=10)
    with pytest.raises(ValueError, match='VisionTransformer predecessor'):
        recycle(_successor(), convnext, progress=False)


def test_weighted_sampler_properties():
    w = torch.tensor([0., 1., 0., 5., 2.])
    for seed in range(20):
        s = weighted_sample(w, 3, make_generator(seed, 'x'))
        assert sorted(s.tolist()) == [1, 3, 4]  # zero weights only once positives run out
    counts = torch.zeros(5)
    for seed in range(400):
        counts[weighted_sample(w, 1, make_generator(seed, 'y'))] += 1
    assert counts[3] > counts[4] > counts[1] and counts[0] == counts[2] == 0
    coact = torch.zeros(40, 40)
    coact[:20, :20] = 10
    coact[20:, 20:] = 10
    parts = partition_graph(coact, 32)  # clamped to 10 parts
    assert parts.max() < 10 and parts.numel() == 40
    assert all(len(set(parts[g].tolist()) & set(parts[20:].tolist())) == 0 for g in [slice(0, 20)])


# --- build on first load, convert -------------------------------------------------------------------------

@pytest.fixture
def pred_dir(tmp_path, predecessor):
    d = tmp_path / 'pred'
    save_for_hf(predecessor, d, safe_serialization=True)
    return d


def _env(tmp_path, pred_dir, **extra):
    env = dict(os.environ, JETMOE_TIMM_CACHE=str(tmp_path / 'cache'), JETMOE_TIMM_PREDECESSOR=f'local-dir:{pred_dir}',
               JETMOE_TIMM_CALIB_IMAGES='8', HF_HUB_OFFLINE='1', **extra)
    return env


def test_build_on_first_load_is_cached_with_its_provenance(tmp_path, pred_dir, monkeypatch, caplog):
    """The first pretrained=True load recycles and caches (one file, with the provenance of what was built how);
    the second reads the cache, even with the predecessor gone. (Concurrent first loads: test_reliability.py.)"""
    import logging
    import shutil
    for k, v in _env(tmp_path, pred_dir).items():
        monkeypatch.setenv(k, v)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4, num_univ_experts=6)
    with caplog.at_level(logging.INFO):
        first = timm.create_model('v_jetmoe_tiny', pretrained=True, num_classes=3, **kw).state_dict()
    assert caplog.text.count('Recycling v_jetmoe_tiny.recycled_in21k') == 1
    (path,) = (tmp_path / 'cache' / 'v_jetmoe_tiny.recycled_in21k').glob('*.safetensors')
    prov = read_provenance(path)
    assert prov['predecessor'] == f"local checkpoint '{pred_dir.name}'" and prov['method'] == 'importance'
    assert {'seed', 'recipe', 'statistic', 'calibration', 'jetmoe_timm_version', 'selection'} <= set(prov)
    shutil.rmtree(pred_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second = timm.create_model('v_jetmoe_tiny', pretrained=True, num_classes=3, **kw).state_dict()
    assert 'Recycling' not in caplog.text
    assert all(torch.equal(second[k], v) for k, v in first.items() if not k.startswith('head.'))


def test_registered_tags_say_the_method_and_recipe_that_build_them():
    """A recycled tag's cfg note names how its weights are built: recycle()'s defaults, which models/ cannot import."""
    from jetmoe_timm.models._pretrained import recycled_note
    from jetmoe_timm.recycle.build import RECYCLE_SOURCES
    from jetmoe_timm.recycle.engine import RECYCLE_DEFAULTS
    assert RECYCLE_SOURCES
    for name, source in RECYCLE_SOURCES.items():
        note = timm.models.get_pretrained_cfg(name).notes[0]
        how = recycled_note('X', RECYCLE_DEFAULTS['method'], RECYCLE_DEFAULTS['recipe']).split(' by ', 1)[1]
        assert note.startswith(f"Recycled init, not fine-tuned: built from {source['predecessor']}") and \
            note.endswith(how), name


def test_predecessor_paths(pred_dir, tmp_path, monkeypatch):
    """A folder's path is timm's 'local-dir:', a bare relative name too (timm would call it an unknown model); a
    checkpoint path that does not exist is named as such (timm would call it a model name with no source prefix)."""
    from jetmoe_timm.export import is_local_spec, public_source
    from jetmoe_timm.recycle.predecessor import load_predecessor
    monkeypatch.chdir(pred_dir.parent)
    assert is_local_spec(pred_dir.name) and public_source(pred_dir.name) == f"local checkpoint '{pred_dir.name}'"
    by_prefix = load_predecessor(f'local-dir:{pred_dir}')
    for by_path in (load_predecessor(str(pred_dir)), load_predecessor(pred_dir.name)):
        for (k, a), b in zip(by_path.state_dict().items(), by_prefix.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    monkeypatch.chdir(tmp_path)  # a bare file by its name alone, whatever its suffix: a file, not a timm name
    state = safetensors.torch.load_file(pred_dir / 'model.safetensors')
    safetensors.torch.save_file(state, 'model.safetensors')
    torch.save(state, 'pred.ckpt')
    for name in ('model.safetensors', 'pred.ckpt'):
        by_name = load_predecessor(name, 'vit_small_patch16_224').state_dict()
        assert all(torch.equal(by_name[k], v) for k, v in by_prefix.state_dict().items() if k in by_name), name
    # a folder in the working directory does not take over a timm name (e.g. `hf download --local-dir` wrote it)
    os.mkdir('vit_small_patch16_224.augreg_in21k')
    name = 'vit_small_patch16_224.augreg_in21k'
    assert not is_local_spec(name) and is_local_spec(f'./{name}')
    for missing in (str(tmp_path / 'nope.safetensors'), 'nope.pth'):
        with pytest.raises(FileNotFoundError, match=f"predecessor file '{re.escape(missing)}' does not exist"):
            load_predecessor(missing, 'vit_small_patch16_224')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='has no config.json'):  # not an offline Hub message
        load_predecessor(str(tmp_path / 'empty'))


def test_public_source_hides_local_paths_only():
    from jetmoe_timm.export import public_source
    assert public_source('hf-hub:org/name') == 'hf-hub:org/name'
    assert public_source('vit_small_patch16_224.augreg_in21k') == 'vit_small_patch16_224.augreg_in21k'
    assert public_source('/home/me/secret/b.pth') == "local checkpoint 'b.pth'"
    assert public_source('local-dir:/home/me/pred/') == "local checkpoint 'pred'"


@pytest.mark.parametrize('how', ['HF_HUB_OFFLINE=1', 'endpoint unreachable'])
def test_offline_first_use_fails_fast_in_one_message(tmp_path, how):
    """Nothing cached and no Hub: one short error naming the predecessor and the ways out, at once (no retry
    storm, no chained traceback), and nothing left in the cache."""
    env = dict(os.environ, JETMOE_TIMM_CACHE=str(tmp_path / 'cache'), HF_HOME=str(tmp_path / 'hf'))
    env.pop('JETMOE_TIMM_PREDECESSOR', None)
    if how == 'HF_HUB_OFFLINE=1':
        env['HF_HUB_OFFLINE'] = '1'
    else:  # a port nothing listens on: the probe is refused, as an unplugged network would be
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        env.update(HF_HUB_OFFLINE='0', HF_ENDPOINT=f'http://127.0.0.1:{port}')
    code = textwrap.dedent('''
        import sys, time, timm, jetmoe_timm
        t0 = time.perf_counter()
        try:
            timm.create_model("v_jetmoe_tiny", pretrained=True)
        finally:
            print(f"library seconds {time.perf_counter() - t0:.2f}", file=sys.stderr)
    ''')
    p = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    err = p.stderr
    assert float(err.split('library seconds ')[1].split()[0]) < 5
    assert 'WeightsUnavailableError' in err and 'vit_small_patch16_224.augreg_in21k' in err
    assert 'JETMOE_TIMM_PREDECESSOR' in err and 'connect' in err
    assert ('HF_HUB_OFFLINE is set' if how == 'HF_HUB_OFFLINE=1' else 'the Hub cannot be reached') in err
    assert 'During handling' not in err and 'direct cause' not in err and 'Retrying' not in err
    assert 'Recycling' not in err  # no "first load; about 45 s" announcement for a build that cannot start
    assert len(err.strip().splitlines()) <= 16  # 4 frames (user, timm, entrypoint, helper) and the message
    assert not list((tmp_path / 'cache').rglob('*.safetensors'))  # nothing half-written


def test_user_source_is_respected(tmp_path, pred_dir, monkeypatch, tiny_vit_kwargs):
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    model = timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs)
    from safetensors.torch import save_file
    f = tmp_path / 'mine.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f)
    loaded = timm.create_model('v_jetmoe_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(f)),
                               **tiny_vit_kwargs)
    assert torch.equal(loaded.blocks[3].mlp.core_experts.fc1.weight, model.blocks[3].mlp.core_experts.fc1.weight)
    assert not (tmp_path / 'cache').exists()  # nothing recycled


def test_convert_cli_writes_loadable_folder(tmp_path, pred_dir, monkeypatch, capsys):
    from jetmoe_timm.tools.cli import main
    out = tmp_path / 'out'
    args = ['convert', 'v_jetmoe_tiny', '--out', str(out), '--predecessor', f'local-dir:{pred_dir}',
            '--method', 'graph', '--num-calib', '8', '--no-progress', '--model-kwargs', 'img_size=32', 'patch_size=4',
            'embed_dim=32', 'depth=4', 'num_heads=2', 'num_core_experts=4', 'num_univ_experts=6']
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'model.safetensors']
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.embed_dim == 32 and model.blocks[3].mlp.num_core_experts == 4
    prov = read_provenance(out / 'model.safetensors')
    assert prov['method'] == 'graph' and len(prov['selection']['channels']) == 32
    before = (out / 'model.safetensors').read_bytes()
    assert main(args) == 2  # exists: a clear error, the folder untouched
    assert (out / 'model.safetensors').read_bytes() == before
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse names the valid methods
        main(args[:6] + ['--method', 'best'])
    assert e.value.code == 2 and "argument --method: invalid choice: 'best' (choose from" in capsys.readouterr().err


def test_convert_cli_ended_by_sigterm_leaves_nothing_behind(tmp_path, pred_dir):
    """`timeout` and schedulers end a command with SIGTERM: convert removes its half-written folder on the way out
    (exit code 143) instead of leaving a hidden temporary folder beside --out."""
    import signal
    import time
    marker = tmp_path / 'writing'
    script = textwrap.dedent(f"""
        import sys, time, safetensors.torch
        from jetmoe_timm.tools.cli import main
        real = safetensors.torch.save_file
        def slow(*args, **kwargs):  # the weights are written; the command is killed before it renames them
            real(*args, **kwargs)
            open({str(marker)!r}, 'w').close()
            time.sleep(60)
        safetensors.torch.save_file = slow
        sys.exit(main(['convert', 'v_jetmoe_tiny', '--out', {str(tmp_path / 'out')!r}, '--predecessor',
                       'local-dir:{pred_dir}', '--num-calib', '2', '--no-progress', '--model-kwargs', 'img_size=32',
                       'patch_size=4', 'embed_dim=32', 'depth=4', 'num_heads=2', 'num_core_experts=4',
                       'num_univ_experts=6']))
    """)
    child = subprocess.Popen([sys.executable, '-c', script], env=dict(os.environ, HF_HUB_OFFLINE='1'))
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), 'the conversion did not reach its write'
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pred', 'writing']  # no out, no .out.* folder


def test_predecessor_input_contract_travels(tmp_path, predecessor, monkeypatch, capsys):
    """Weights trained with some preprocessing keep it: the converted folder, the first-load build and the
    calibration all use the predecessor's mean / std / interpolation / crop, not the V-JetMoE default."""
    from timm.data import resolve_model_data_config
    from jetmoe_timm.tools.cli import main
    from jetmoe_timm.hub import render_model_card
    from jetmoe_timm.recycle.calibration import calibration_batches
    contract = dict(mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7), interpolation='bilinear', crop_pct=0.75)
    pred = timm.create_model('vit_small_patch16_224', pretrained_cfg_overlay=contract, **PRED_KWARGS)
    pred.load_state_dict(predecessor.state_dict())
    d = tmp_path / 'pred'
    save_for_hf(pred, d, safe_serialization=True)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4, num_univ_experts=6)

    def expected(model):
        cfg = resolve_model_data_config(model)
        return {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in contract}  # JSON gives lists

    out = tmp_path / 'out'
    assert main(['convert', 'v_jetmoe_tiny', '--out', str(out), '--predecessor', f'local-dir:{d}', '--num-calib', '8',
                 '--no-progress', '--model-kwargs'] + [f'{k}={v}' for k, v in kw.items()]) == 0
    said = capsys.readouterr().out  # 8 images of 32 features: too few for the figure to tell, and it says so
    assert 'retention: linear CKA' in said and ('on fewer images than its 32 feature dimensions CKA reads high for '
                                                'any model: read it against the random-init figure, or calibrate '
                                                'on more images (it uses up to 256: --num-calib, and a --calib '
                                                'folder that holds them)') in said
    assert expected(timm.create_model(f'local-dir:{out}', pretrained=True)) == contract
    given = timm.create_model('v_jetmoe_tiny', pretrained=True, **kw,  # as train.py's --pretrained-path passes it
                              pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    assert expected(given) == contract
    card = render_model_card(out, 'me/v_jetmoe_tiny_mine')
    assert 'Retention at init' in card and 'mean (0.1, 0.2, 0.3)' in card

    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{d}')
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '8')
    built = timm.create_model('v_jetmoe_tiny', pretrained=True, **kw)  # recycled on first load
    assert expected(built) == contract
    assert built.pretrained_cfg['mean'] != timm.create_model('v_jetmoe_tiny', **kw).pretrained_cfg['mean']

    # calibration images get exactly that preprocessing, at the size asked for
    Image.new('RGB', (40, 40), (128, 128, 128)).save(tmp_path / 'grey.png')
    batches, _, _ = calibration_batches(tmp_path, pred, num_images=1, batch_size=1, img_size=(16, 16))
    x = next(iter(batches))
    assert x.shape == (1, 3, 16, 16)
    want = (128 / 255 - torch.tensor(contract['mean'])) / torch.tensor(contract['std'])
    torch.testing.assert_close(x[0, :, 8, 8], want, atol=1e-3, rtol=0)


def test_recycle_subpackage_is_importable_by_module_path():
    """The package attribute ``jetmoe_timm.recycle`` is the subpackage, not a function hiding it."""
    import importlib
    import jetmoe_timm
    import jetmoe_timm.recycle.folder as folder
    assert jetmoe_timm.recycle is importlib.import_module('jetmoe_timm.recycle')
    assert folder.convert is jetmoe_timm.convert is jetmoe_timm.recycle.convert
    assert jetmoe_timm.recycle.recycle is recycle


def test_registered_tags_carry_their_predecessors_preprocessing():
    """Every recycled tag's cfg asks for the preprocessing its predecessor was trained with."""
    from timm.models import get_pretrained_cfg
    from jetmoe_timm.recycle import RECYCLE_SOURCES
    assert {'v_jetmoe_tiny.recycled_deit3_in22k', 'v_jetmoe_small.recycled_deit3_in22k'} <= set(RECYCLE_SOURCES)
    for tag, source in RECYCLE_SOURCES.items():
        ours, theirs = get_pretrained_cfg(tag), get_pretrained_cfg(source['predecessor'])
        assert (ours.mean, ours.std, ours.interpolation) == (theirs.mean, theirs.std, theirs.interpolation), tag


def test_deit3_tag_builds_from_a_deit3_predecessor(tmp_path, monkeypatch, tiny_vit_kwargs, caplog):
    """A second ViT flavour, added by a spec entry alone: DeiT-3 (layer scale, no class position embedding)."""
    torch.manual_seed(0)
    deit3 = timm.create_model('deit3_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=4, pretrained_cfg='fb_in22k_ft_in1k')
    assert deit3.no_embed_class and deit3.blocks[0].ls1.gamma.numel() == 64
    save_for_hf(deit3, tmp_path / 'deit3', safe_serialization=True)
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{tmp_path / "deit3"}')
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '8')
    model = timm.create_model('v_jetmoe_tiny.recycled_deit3_in22k', pretrained=True, num_classes=3,
                              pretrained_strict=True, **tiny_vit_kwargs)  # a factory option: passed through
    (built,) = (tmp_path / 'cache' / 'v_jetmoe_tiny.recycled_deit3_in22k').glob('*.safetensors')
    # a first build says, at WARNING (shown by a default Python process), what, from what, how long and where
    (said,) = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING' and 'first load' in r.getMessage()]
    assert said.startswith('Recycling v_jetmoe_tiny.recycled_deit3_in22k from local-dir:') and str(built) in said
    assert ' s on 2 CPU cores for ' in said
    prov = read_provenance(built)
    assert prov['model'] == 'v_jetmoe_tiny.recycled_deit3_in22k' and prov['retention']['cka'] > 0
    assert tuple(model.pretrained_cfg['mean']) == (0.485, 0.456, 0.406)
    assert not model.no_embed_class and model.pos_embed.shape[1] == 1 + 8 * 8


def _flip_tensor_bytes(path, count=16):
    """Flip ``count`` bytes inside the tensor data of a safetensors file (after its header)."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], 'little') + 64
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def test_damaged_weights_are_refused_through_every_path(tmp_path, monkeypatch, tiny_vit_kwargs):
    """A file the library wrote carries a content checksum: flipped bytes are caught whichever way it is loaded
    (local-dir: folder, file= overlay / train.py's --pretrained-path, an hf-hub: repo's cached copy)."""
    from jetmoe_timm.export import save_pretrained_folder
    torch.manual_seed(0)
    folder = save_pretrained_folder(timm.create_model('v_jetmoe_tiny', **tiny_vit_kwargs), tmp_path / 'conv')
    weights = folder / 'model.safetensors'
    timm.create_model(f'local-dir:{folder}', pretrained=True)  # intact: loads
    # an hf-hub: repo as the Hugging Face cache holds it (offline: timm reads the cached snapshot)
    snapshot = tmp_path / 'hf' / 'hub' / 'models--me--tiny' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('0' * 40)
    for name in ('model.safetensors', 'config.json'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
    timm.create_model('hf-hub:me/tiny', pretrained=True)  # intact: loads from the cache
    _flip_tensor_bytes(weights)
    _flip_tensor_bytes(snapshot / 'model.safetensors')
    for load in (lambda: timm.create_model(f'local-dir:{folder}', pretrained=True),
                 lambda: timm.create_model('v_jetmoe_tiny', pretrained=True, **tiny_vit_kwargs,
                                           pretrained_cfg_overlay=dict(file=str(weights))),
                 lambda: timm.create_model('hf-hub:me/tiny', pretrained=True)):
        with pytest.raises(ValueError, match='Refusing to load damaged weights: .*content checksum'):
            load()


@pytest.mark.parametrize('flavour, classes, suffix', [  # heads of width 64, as timm's ViTs have them
    (dict(embed_dim=128, num_heads=2), 21843, '.safetensors'),  # augreg in21k-like, with its 21k head
    (dict(embed_dim=128, num_heads=2, patch_size=8, img_size=40, init_values=1e-5, reg_tokens=2,
          no_embed_class=True), 0, '.pth'),  # DINOv2-reg-like, headless
    (dict(embed_dim=64, num_heads=1, depth=3, class_token=False, global_pool='avg'), 1000, '.bin'),  # smaller
    # qk-norm: its weights give the heads' width, here 16 (4 heads) where 64-wide heads would have made 1
    (dict(embed_dim=64, num_heads=4, qk_norm=True), 1000, '.safetensors'),
])
def test_bare_predecessor_file_of_any_head_and_size(tmp_path, caplog, flavour, classes, suffix):
    """A predecessor as users have it: a bare checkpoint file, any head, any compatible size; the architecture
    is read off its tensors and said in one line."""
    import logging
    from safetensors.torch import save_file
    from jetmoe_timm.recycle import build_recycled
    kwargs = dict(PRED_KWARGS, num_classes=classes, **flavour)
    torch.manual_seed(0)
    pred = _randomize(timm.create_model('vit_small_patch16_224', **kwargs))
    path = tmp_path / f'pred{suffix}'
    state = {k: v.contiguous() for k, v in pred.state_dict().items()}
    save_file(state, path) if suffix == '.safetensors' else torch.save({'model': state}, path)
    succ_kwargs = dict(img_size=kwargs['img_size'], patch_size=kwargs.get('patch_size', 4), embed_dim=32,
                       depth=kwargs['depth'], num_heads=kwargs['num_heads'] // 2 or 1, num_core_experts=2,
                       num_univ_experts=2, num_classes=0, class_token=kwargs.get('class_token', True),
                       reg_tokens=kwargs.get('reg_tokens', 0), qk_norm=kwargs.get('qk_norm', False))
    with caplog.at_level(logging.WARNING, logger='jetmoe_timm.recycle.predecessor'):
        succ, result = build_recycled('v_jetmoe_tiny', succ_kwargs, predecessor=str(path), num_calib=8,
                                      progress=False)
    (line,) = [r.getMessage() for r in caplog.records if 'read off its tensors' in r.getMessage()]
    assert f"embed_dim={kwargs['embed_dim']}" in line and f"depth={kwargs['depth']}" in line
    assert (f'its {classes}-class head is not used' in line) == bool(classes)
    assert "a bare file does not record these, assumed: num_heads as most of timm's ViTs of that width have them " \
           "(64-wide heads; 16 for ViT-H, g, G, so400m) where no qk-norm weights give their width, a square patch " \
           "grid" in line
    assert f"num_heads={kwargs['num_heads']}," in line  # the heads it was built with: read, or rightly assumed
    ch = result.selection['channels']
    torch.testing.assert_close(succ.blocks[0].norm1.weight, pred.blocks[0].norm1.weight[ch], rtol=0, atol=0)


@pytest.mark.parametrize('name', ['vit_huge_patch14_224', 'vit_giant_patch14_224', 'vit_gigantic_patch14_224',
                                  'vit_base_patch16_clip_224', 'vit_large_patch14_clip_quickgelu_224',
                                  'vit_medium_patch16_gap_256', 'vit_small_patch16_224', 'deit3_base_patch16_224',
                                  'vit_base_patch14_reg4_dinov2'])
@pytest.mark.parametrize('hint_arch', ['vit_small_patch16_224', 'vit_base_patch16_clip_224'])
def test_bare_vit_file_of_a_real_architecture_is_read_as_it_was_built(name, hint_arch):
    """The architecture read off a bare file's tensors (shapes only: the model is built on the meta device) is the
    one timm built: the heads of ViT-H / g / G (16 of 80-104 dims, not 64-wide), CLIP's pre-norm and missing patch
    bias, DINOv2's registers and layer scale. Such files were refused (CLIP) or misread (ViT-H: 20 heads). Under
    the entrypoint of an architecture with other layers (CLIP's pre-norm) too: what the file lacks is said."""
    from jetmoe_timm.recycle.vit import predecessor_args
    model = timm.create_model(name, device='meta')
    hint = timm.create_model(hint_arch, device='meta')
    args = predecessor_args(model.state_dict(), hint)
    rebuilt = timm.models.model_entrypoint(hint_arch)(pretrained=False, device='meta', **args)
    assert rebuilt.blocks[0].attn.num_heads == model.blocks[0].attn.num_heads
    assert {k: v.shape for k, v in rebuilt.state_dict().items() if not k.startswith('head')} == \
           {k: v.shape for k, v in model.state_dict().items() if not k.startswith('head')}


def test_a_tensor_no_layer_option_places_is_refused_without_a_wrong_option():
    """Where the family's table of layer options names none for the tensors (here a ViT's class token, which only
    check_nothing_lost is asked about), the refusal names no option rather than one that cannot help."""
    import dataclasses
    from jetmoe_timm.recycle.engine import check_nothing_lost
    from jetmoe_timm.recycle.families import family_of
    from jetmoe_timm.recycle.family import LayerOption
    pred = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=0, class_token=False, global_pool='avg')
    succ = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_core_experts=2, num_univ_experts=2)
    family = family_of(succ)
    with pytest.raises(ValueError, match=r'nothing for \(cls_token\): build it with the layers of the predecessor '
                                         r'\(no single option is known to place them\)\.$'):
        check_nothing_lost(family, pred, succ)
    table_says = dataclasses.replace(family, layer_options=family.layer_options + (
        LayerOption(r'cls_token', 'class_token', True, False),))
    with pytest.raises(ValueError, match=r'nothing for \(cls_token\): build it with class_token=False\.$'):
        check_nothing_lost(table_says, pred, succ)


def test_prefix_token_and_head_refusals_name_the_fix(tmp_path):
    """A predecessor with other class / register tokens than the successor: both counts and the kwargs that fix it;
    more successor heads than a bare file's assumed ones: the limit and the way to give the real heads."""
    from jetmoe_timm.recycle import recycle
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, reg_tokens=4, num_classes=0))
    succ = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_core_experts=2, num_univ_experts=2)
    with pytest.raises(ValueError) as e:
        recycle(succ, pred, calib='weights', progress=False)
    assert str(e.value).endswith('the predecessor has class_token=True, reg_tokens=4, the successor class_token=True, '
                                 'reg_tokens=0: give the successor --model-kwargs class_token=True reg_tokens=4.')
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, embed_dim=64, num_heads=1, num_classes=0))
    succ = timm.create_model('v_jetmoe_tiny', img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             num_core_experts=2, num_univ_experts=2)
    with pytest.raises(ValueError, match=r"the predecessor only 1: use num_heads <= 1 \(if the predecessor is a bare "
                                         r"checkpoint file, which does not record its heads, they were assumed 64 "
                                         r"wide: pass a 'local-dir:'"):
        recycle(succ, pred, calib='weights', progress=False)


def test_bare_file_that_is_not_a_timm_checkpoint_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file
    from jetmoe_timm.recycle import build_recycled
    save_file({'encoder.weight': torch.zeros(3, 3)}, tmp_path / 'other.safetensors')
    with pytest.raises(ValueError, match='not a timm-format VisionTransformer checkpoint') as e:
        build_recycled('v_jetmoe_tiny', dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2),
                       predecessor=str(tmp_path / 'other.safetensors'), calib='weights', progress=False)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('flavour', [
    {},
    dict(ls_init_value=None),  # no layer scale, where timm's ConvNeXts have one by default
    dict(head_hidden_size=48),  # the 'mlp' heads of convnext_large_mlp and the like
    dict(head_norm_first=True),  # convnext_tiny_hnf
    dict(conv_bias=False),  # refused before: the tensors' missing biases were not read
])
def test_bare_convnext_predecessor_file(tmp_path, caplog, flavour):
    import logging
    from safetensors.torch import save_file
    from jetmoe_timm.recycle import build_recycled
    torch.manual_seed(0)
    # the entrypoint: timm.create_model drops ls_init_value=None and would bring back the default layer scale
    pred = _randomize(timm.models.model_entrypoint('convnext_tiny')(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40),
                                                                     num_classes=21841, **flavour))
    save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, tmp_path / 'cnx.safetensors')
    with caplog.at_level(logging.WARNING, logger='jetmoe_timm.recycle.predecessor'):
        succ, r = build_recycled('c_jetmoe_femto', dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=2,
                                                        num_univ_experts=2, num_classes=0,
                                                        **{k: v for k, v in flavour.items() if v is not None}),
                                 predecessor=str(tmp_path / 'cnx.safetensors'), num_calib=4, progress=False)
    assert any('depths=(1, 1, 2, 1), dims=(16, 24, 32, 40)' in rec.getMessage() and '21841-class head' in
               rec.getMessage() for rec in caplog.records)
    ch = r.selection['stage0.channels']
    torch.testing.assert_close(succ.stem[1].weight, pred.stem[1].weight[ch], rtol=0, atol=0)
    if 'ls_init_value' in flavour:  # the successor's layer scale passes the block's output as the predecessor's did
        assert all(torch.equal(b.gamma, torch.ones_like(b.gamma)) for s in succ.stages for b in s.blocks)


@pytest.mark.parametrize('model, arch, kwargs, says', [
    ('v_jetmoe_tiny', 'vit_small_patch16_224', dict(PRED_KWARGS, global_pool='map'), 'pools with attention'),
    ('v_jetmoe_tiny', 'deit_small_distilled_patch16_224', PRED_KWARGS, 'is a distilled DeiT'),
    ('c_jetmoe_femto', 'convnextv2_tiny', dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40)), 'ConvNeXt-V2'),
])
def test_bare_file_of_a_kind_the_plan_cannot_take_says_why(tmp_path, model, arch, kwargs, says):
    """A bare file of a predecessor the plan refuses (SigLIP's attention pooling, a distilled DeiT, a ConvNeXt-V2)
    is refused for what it is, as a folder of it is, not as a file that fits no architecture."""
    from jetmoe_timm.recycle import build_recycled
    torch.save(timm.create_model(arch, **kwargs).state_dict(), tmp_path / 'pred.pth')
    with pytest.raises(ValueError, match=says) as e:
        build_recycled(model, {}, predecessor=str(tmp_path / 'pred.pth'), calib='weights', progress=False)
    assert 'does not fit' not in str(e.value) and 'not a timm-format' not in str(e.value)


def test_bare_vit_file_without_layer_scale_under_a_tag_whose_predecessor_has_it(tmp_path):
    """A plain ViT file given for the DeiT-3 tag (whose architecture has layer scale by default): read as it is,
    without layer scale, not refused for missing the gammas that the architecture's default would add."""
    from jetmoe_timm.recycle import build_recycled
    torch.manual_seed(0)
    pred = _randomize(timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, embed_dim=128, num_heads=2,
                                                                        num_classes=0)))  # heads 64 wide, as timm's
    torch.save(pred.state_dict(), tmp_path / 'plain.pth')
    succ, r = build_recycled('v_jetmoe_tiny.recycled_deit3_in22k', dict(SUCC_KWARGS, num_classes=0),
                             predecessor=str(tmp_path / 'plain.pth'), calib='weights', progress=False)
    ch = r.selection['channels']
    torch.testing.assert_close(succ.blocks[0].norm1.weight, pred.blocks[0].norm1.weight[ch], rtol=0, atol=0)


def test_resizing_a_predecessor_shares_its_blocks_and_leaves_it_as_it_was():
    """The successor's input layout (another size, prefix tokens without position embeddings) is made on a copy
    that owns only the layers it changes: the blocks are not held twice, and the predecessor is untouched."""
    from jetmoe_timm.recycle.vit import resize
    pred = _randomize(timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, reg_tokens=2)))
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    succ = timm.create_model('v_jetmoe_tiny', **dict(SUCC_KWARGS, img_size=48, reg_tokens=2, no_embed_class=True))
    resized = resize(pred, succ)
    assert resized.blocks is pred.blocks and resized.patch_embed is not pred.patch_embed
    assert resized.no_embed_class and not pred.no_embed_class and tuple(resized.patch_embed.img_size) == (48, 48)
    assert all(torch.equal(v, before[k]) for k, v in pred.state_dict().items())
    assert tuple(pred.patch_embed.img_size) == (32, 32) and pred.pos_embed.shape[1] == 64 + 3
    assert not torch.equal(resized.cls_token, pred.cls_token)  # its position embedding moved into the token


def test_recycle_cache_keys_a_calibration_folder_by_where_it_is(tmp_path, monkeypatch):
    """JETMOE_TIMM_CALIB=calib from two projects is two folders, two builds; one folder spelled two ways is one.
    The same for the official recipe's body predecessor."""
    from jetmoe_timm.recycle.build import _cache_key
    keys, body_keys = {}, {}
    for project in ('a', 'b'):
        (tmp_path / project / 'calib').mkdir(parents=True)
        (tmp_path / project / 'body').mkdir()
        monkeypatch.chdir(tmp_path / project)
        keys[project] = _cache_key('v_jetmoe_tiny.recycled_in21k', {}, 'vit_small_patch16_224', dict(calib='calib'))
        body_keys[project] = _cache_key('v_jetmoe_tiny.recycled_in21k', {}, 'vit_small_patch16_224',
                                        dict(recipe='official', body_predecessor='body'))
    assert keys['a'] != keys['b'] and body_keys['a'] != body_keys['b']
    assert keys['b'] == _cache_key('v_jetmoe_tiny.recycled_in21k', {}, 'vit_small_patch16_224',
                                   dict(calib=str(tmp_path / 'b' / 'calib')))
    assert _cache_key('m', {}, 'p', dict(calib='synthetic')) != _cache_key('m', {}, 'p', dict(calib='weights'))


def test_recycle_cache_fingerprints_every_weights_file_timm_reads_from_a_folder(tmp_path):
    """A folder predecessor's fingerprint covers each file timm's local-dir loader may read (its '.pth.tar' too) and
    config.json, nothing else: replacing any of them invalidates the cached build, a README does not."""
    from jetmoe_timm.recycle.build import _local_fingerprint
    for name in ('config.json', 'model.pth.tar', 'a.safetensors', 'b.pth', 'c.bin', 'README.md', 'notes.tar'):
        (tmp_path / name).write_bytes(b'x' * len(name))
    names = [n for n, _, _ in _local_fingerprint(f'local-dir:{tmp_path}')]
    assert sorted(names) == ['a.safetensors', 'b.pth', 'c.bin', 'config.json', 'model.pth.tar']


def test_recycle_cache_follows_a_local_predecessor_replaced_in_place(tmp_path, monkeypatch, tiny_vit_kwargs):
    """A cached build records its local predecessor's size and mtime (a folder's config.json and weights, or the
    file): other weights written to the same path are recycled again, not served from the stale cache."""
    from safetensors.torch import save_file
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '4')
    cached = lambda: {f: f.stat().st_mtime_ns for f in (tmp_path / 'cache').rglob('*.safetensors')}  # noqa: E731
    for spec in (f'local-dir:{tmp_path / "pred"}', str(tmp_path / 'pred.safetensors')):
        monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', spec)
        loads = []
        for seed in (0, 1, 1):  # the third load: unchanged, read from the cache
            torch.manual_seed(seed)
            # other weights for another seed; 64-wide heads, which a bare file's head count is read off
            pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, embed_dim=128, num_heads=2))
            if seed == 0 or len(loads) == 1:  # written again only when replaced
                if spec.startswith('local-dir:'):
                    save_for_hf(pred, tmp_path / 'pred', safe_serialization=True)
                else:
                    save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, tmp_path / 'pred.safetensors')
            before = cached()
            loads.append(timm.create_model('v_jetmoe_tiny', pretrained=True, **tiny_vit_kwargs))
            loads[-1].built = cached() != before
        assert [m.built for m in loads] == [True, True, False], spec
        a, b, c = (m.blocks[0].attn.qkv.weight for m in loads)
        assert not torch.equal(a, b) and torch.equal(b, c), spec


def test_recycle_cache_follows_a_body_predecessor_replaced_in_place(tmp_path, monkeypatch, caplog):
    """The official recipe's body predecessor, a local file, is tied to the cached build as the predecessor is:
    other weights written to its path are recycled again (was: served from the cache, keyed by the path only)."""
    import logging
    from jetmoe_timm.recycle import cached_recycled_file
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    torch.manual_seed(0)
    save_for_hf(timm.create_model('vit_small_patch16_224', **PRED_KWARGS), tmp_path / 'pred')
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{tmp_path / "pred"}')
    kwargs = {k: v for k, v in SUCC_KWARGS.items() if k != 'num_classes'}
    built = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        body = timm.create_model('vit_tiny_patch16_224', **dict(PRED_KWARGS, embed_dim=32, num_heads=2))
        save_for_hf(body, tmp_path / 'body')  # a folder: a bare file's heads are assumed 64 wide
        with caplog.at_level(logging.WARNING, logger='jetmoe_timm'):
            path = cached_recycled_file('v_jetmoe_tiny.recycled_in21k', kwargs, recipe='official',
                                        body_predecessor=f'local-dir:{tmp_path / "body"}', calib='weights')
        built.append(safetensors.torch.load_file(path)['blocks.0.mlp.fc1.weight'])
    assert torch.equal(built[1], body.blocks[0].mlp.fc1.weight.detach())  # the body, verbatim: the new one
    assert not torch.equal(built[0], built[1])
    assert 'the body predecessor has changed since' in caplog.text


def test_first_load_recycles_a_grey_scale_predecessor_file(tmp_path, monkeypatch, caplog, tiny_vit_kwargs):
    """A 1-channel predecessor file behind a tag, where in_chans never reaches the build (timm adapts it on load):
    the predecessor's stem is adapted to the tag's 3 channels by timm's rule, so the file and its cfg are RGB as the
    tag's (train.py's data config reads 3 channels), and in_chans=1 gets the grey stem back. Was refused with
    'build the successor with in_chans=1'."""
    import logging
    from safetensors.torch import save_file
    from timm.data import resolve_data_config
    torch.manual_seed(0)  # 64-wide heads, which a bare file's head count is read off
    pred = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, embed_dim=128, num_heads=2, in_chans=1))
    save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, tmp_path / 'grey.safetensors')
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', str(tmp_path / 'grey.safetensors'))
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '4')
    rgb = timm.create_model('v_jetmoe_tiny', pretrained=True, **tiny_vit_kwargs).eval()
    grey = timm.create_model('v_jetmoe_tiny', pretrained=True, in_chans=1, **tiny_vit_kwargs).eval()  # the cache
    assert len(list((tmp_path / 'cache').rglob('*.safetensors'))) == 1
    assert rgb.patch_embed.proj.in_channels == 3 and resolve_data_config({}, model=rgb)['input_size'][0] == 3
    assert grey.patch_embed.proj.in_channels == 1
    # the grey stem back: each successor row is the predecessor's row of a kept channel
    kept = torch.cdist(grey.patch_embed.proj.weight.flatten(1), pred.patch_embed.proj.weight.flatten(1),
                       compute_mode='donot_use_mm_for_euclid_dist').min(1)
    assert kept.values.max() < 1e-6 and len(set(kept.indices.tolist())) == grey.embed_dim
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(rgb(x.expand(-1, 3, -1, -1)), grey(x), rtol=1e-4, atol=1e-5)  # a grey image in RGB
    # four channels (RGB + near infrared): timm's rule keeps three, as timm does loading such weights at in_chans=3
    four = timm.create_model('vit_small_patch16_224', **dict(PRED_KWARGS, embed_dim=128, num_heads=2, in_chans=4))
    save_file({k: v.contiguous() for k, v in four.state_dict().items()}, tmp_path / 'four.safetensors')
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', str(tmp_path / 'four.safetensors'))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='jetmoe_timm.recycle.build'):
        rgb = timm.create_model('v_jetmoe_tiny', pretrained=True, **tiny_vit_kwargs)
    assert rgb.patch_embed.proj.in_channels == 3
    assert "takes 4 input channels: its stem is adapted to the successor's 3 by timm's rule; its weights for the " \
           "channels beyond the first 3 are dropped" in caplog.text and "to get it back" not in caplog.text


def test_bare_vit_file_with_a_tiny_grid_is_read_or_refused_never_misread(tmp_path):
    """A bare file's grid and prefix-token embedding are read off pos_embed; a grid whose rows also fit the other
    convention (9 rows with 5 prefix tokens: 3x3 alone, or 2x2 after 5) is refused, and prefix tokens that outnumber
    the grid's rows read as having no embedding (they were 'not timm-format', or a grid of 0)."""
    from safetensors.torch import save_file
    from jetmoe_timm.recycle.predecessor import load_predecessor

    def load(**kwargs):
        model = timm.create_model('vit_small_patch16_224', patch_size=8, embed_dim=64, depth=1, num_heads=1,
                                  num_classes=0, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / 'p.safetensors')
        return load_predecessor(str(tmp_path / 'p.safetensors'), 'vit_small_patch16_224.augreg_in21k')
    # DINOv2-reg style at 24 px: was read as a 2x2 grid with prefix embeddings, silently
    with pytest.raises(ValueError, match=r"pos_embed of 9 rows \(5 prefix tokens\) fits both a 2x2 patch grid with "
                                         r"no_embed_class=False and a 3x3 patch grid with no_embed_class=True: pass "
                                         r"a 'local-dir:' folder with its config.json\.$"):
        load(img_size=24, reg_tokens=4, no_embed_class=True)
    for kwargs in (dict(img_size=16, class_token=False, reg_tokens=4, global_pool='avg'),
                   dict(img_size=16, reg_tokens=4), dict(img_size=8, reg_tokens=1), dict(img_size=32, reg_tokens=4)):
        pred = load(no_embed_class=True, **kwargs)
        assert pred.no_embed_class and pred.patch_embed.img_size == (kwargs['img_size'],) * 2, kwargs


@pytest.mark.parametrize('terminal', [True, False])
def test_progress_bar_on_a_terminal_only(predecessor, monkeypatch, terminal):
    """progress=True draws tqdm's bar where stderr is a terminal; redirected to a file or a pipe, its
    carriage-return frames would fill the log, so nothing is written."""
    import io

    class Stderr(io.StringIO):
        def isatty(self):
            return terminal

    err = Stderr()
    monkeypatch.setattr(sys, 'stderr', err)
    recycle(_successor(), predecessor, num_calib=8, batch_size=4, calib='synthetic')
    written = err.getvalue()
    assert ('recycling VisionTransformerJetMoE' in written and '\r' in written) == terminal
    assert terminal or written == ''


def test_a_cache_folder_that_cannot_be_written_is_said_in_one_line(tmp_path, monkeypatch):
    """A read-only cache answers what it holds; a build it cannot take names the folder and the variable that moves
    it (was filelock's traceback on the lock file)."""
    from jetmoe_timm.recycle import build
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))

    def refused(path):  # as a cache folder of mode 0555 answers a user who does not own it (not root)
        raise PermissionError(13, 'Permission denied', f'{path}.lock')
    monkeypatch.setattr(build, '_lock', refused)
    with pytest.raises(PermissionError, match=r'Cannot build v_jetmoe_tiny.recycled_in21k into the cache at .* '
                                              r'\(Permission denied\): set JETMOE_TIMM_CACHE to a folder you can '
                                              r'write to\.'):
        build.cached_recycled_file('v_jetmoe_tiny', {}, calib='weights')


def test_the_registered_tags_describe_what_a_build_with_the_defaults_makes():
    """A recycled tag's registered note names the recycler's default method and recipe (models cannot import the
    recycler, so the note states them itself): a change of either default must change the note too."""
    from jetmoe_timm.recycle.build import RECYCLE_SOURCES
    from jetmoe_timm.recycle.engine import RECYCLE_DEFAULTS
    for tag, source in RECYCLE_SOURCES.items():
        (note,) = timm.models.get_pretrained_cfg(tag).notes
        assert source['predecessor'] in note, tag
        assert f"by {RECYCLE_DEFAULTS['method']} sampling ({RECYCLE_DEFAULTS['recipe']} recipe)" in note, tag
