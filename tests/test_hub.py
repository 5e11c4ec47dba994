"""Publishing to the Hub and loading back: the real huggingface_hub client and timm's loaders, over real HTTP, against
a local Hub stand-in (tests/hub_server.py). huggingface_hub reads HF_ENDPOINT at import, so whatever talks to the
server runs in a subprocess with the environment set; in-process tests stay offline (conftest)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from timm.models import get_pretrained_cfg, save_for_hf

from hub_server import LocalHub
from jetmoe_timm.tools.cli import main
from jetmoe_timm.export import save_pretrained_folder
from jetmoe_timm.export import CARD_MARK
from jetmoe_timm.hub import UPLOAD_FILES, push_to_hub, render_model_card
from jetmoe_timm.model_card import CARD_DIR
from jetmoe_timm.profile import count_macs, count_params

REPO = 'jetmoe-test/v_jetmoe_tiny.pushed'
PROVENANCE = dict(predecessor='vit_small_patch16_224.augreg_in21k', method='importance', recipe='paper',
                  statistic='l2', calibration='synthetic', calibration_images=16, seed=0, jetmoe_timm_version='0.1.0')


@pytest.fixture
def tiny_model(tiny_vit_kwargs):
    torch.manual_seed(0)
    return timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs).eval()


@pytest.fixture
def tiny_folder(tmp_path, tiny_model):
    """A converted folder as `jetmoe-timm convert` writes it, with random weights."""
    return save_pretrained_folder(tiny_model, tmp_path / 'converted', PROVENANCE)


@pytest.fixture
def local_hub(tmp_path):
    with LocalHub(tmp_path / 'hub', max_lifetime_s=180) as hub:
        yield hub


def _front_matter(card: str) -> dict:
    assert card.startswith('---\n')
    return yaml.safe_load(card.split('\n---\n', 1)[0][4:])


def _client_env(home, endpoint, **extra):
    """The environment of a huggingface_hub client process talking to ``endpoint`` with a fresh HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'TRANSFORMERS_OFFLINE')}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_OFFLINE='0', HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', JETMOE_TIMM_CACHE=str(home / 'jetmoe_cache'), **extra)
    return env


def _run(code, env, expect_rc=0):
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == expect_rc, f'rc={r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}'
    return r


# --- end to end: push, re-push, load three ways ----------------------------------------------------------

_PUSH = """
    import os, shutil, sys, tempfile
    from huggingface_hub import HfApi
    from jetmoe_timm.tools.cli import main
    args = ['push', '--from', {folder!r}, '--repo-id', {repo!r}]
    assert main(args + ['--endpoint', {dead!r}]) == 2  # unreachable: a one-line error
    assert main(args + ['--dry-run']) == 0
    assert not HfApi().repo_exists({repo!r})  # the dry run sent nothing
    print('=== push')
    assert main(args) == 0
    print('=== re-push')
    assert main(args) == 0
    print('=== branch')
    assert main(args + ['--revision', 'v1']) == 0
    copy = shutil.copytree({folder!r}, tempfile.mkdtemp() + '/copy')  # a push writes the card for its repo
    print('=== private')
    assert main(['push', '--from', copy, '--repo-id', {repo!r} + '-private', '--private',
                 '--commit-message', 'my own message']) == 0
    print('=== bad token')
    os.environ['HF_TOKEN'] = 'hf_not_the_token'
    assert main(['push', '--from', copy, '--repo-id', {repo!r}, '--revision', 'v2']) == 2
"""

_LOAD = """
    import json, os, sys
    import safetensors.torch, timm, torch
    from huggingface_hub import snapshot_download
    from timm.models import generate_default_cfgs, register_model
    import jetmoe_timm
    from jetmoe_timm.models.vit_jetmoe import _cfg, _create_vit_jetmoe
    torch.set_num_threads(2)
    repo, home, tiny = {repo!r}, {home!r}, {tiny!r}

    # The registered v_jetmoe_tiny is 265 M parameters; prepare_pretrained fetches a cfg's hf_hub_id only for the
    # registered architecture, so register a tiny twin whose default cfg points at the pushed repo.
    default_cfgs = generate_default_cfgs({{'v_jetmoe_hubtest.pushed': _cfg(
        hf_hub_id=repo, num_classes=10, input_size=(3, 32, 32))}})

    @register_model
    def v_jetmoe_hubtest(pretrained=False, **kwargs):
        return _create_vit_jetmoe('v_jetmoe_hubtest', pretrained=pretrained, model_args=dict(tiny), **kwargs)

    snapshot = snapshot_download(repo, local_dir=os.path.join(home, 'snapshot'))
    models = dict(
        hf_hub_id=timm.create_model('v_jetmoe_hubtest', pretrained=True, cache_dir=os.path.join(home, 'c1')),
        hf_hub=timm.create_model('hf-hub:' + repo, pretrained=True, cache_dir=os.path.join(home, 'c2')),
        local_dir=timm.create_model('local-dir:' + snapshot, pretrained=True),
        # another image size: the same Hub copy, its position grid resampled on load (nothing recycled)
        img_size=timm.create_model('v_jetmoe_hubtest', pretrained=True, img_size=48,
                                   cache_dir=os.path.join(home, 'c1')),
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = {{}}
    for key, model in models.items():
        out.update({{f'{{key}}/{{k}}': v for k, v in model.state_dict().items()}})
        if key != 'img_size':
            out[f'{{key}}/logits'] = model.eval()(x).detach()
    safetensors.torch.save_file({{k: v.contiguous() for k, v in out.items()}}, os.path.join(home, 'loaded.safetensors'))
    print(json.dumps(dict(snapshot=sorted(os.listdir(snapshot)))))
"""


def _dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'


def test_push_repush_and_load_three_ways(tmp_path, local_hub, tiny_folder, tiny_model):
    push_env = _client_env(tmp_path / 'pusher', local_hub.url, HF_TOKEN=local_hub.token)
    dead = _dead_endpoint()
    r = _run(_PUSH.format(folder=str(tiny_folder), repo=REPO, dead=dead), push_env)
    assert f'jetmoe-timm push: error: Cannot reach the Hub at {dead} (nothing answers)' in r.stderr
    assert 'HF_ENDPOINT' in r.stderr and 'Traceback' not in r.stderr
    dry, push, repush, branch, private, bad_token = r.stdout.split('=== ')
    assert 'dry run: would upload' in dry and 'nothing was sent' in dry

    # the dry run reached the server only through the repo_exists probe; then exactly one commit was made
    hub_calls = [c for c in local_hub.requests if c[1] != '/api/agent-harnesses']
    assert hub_calls[:2] == [('GET', f'/api/models/{REPO}'), ('POST', '/api/repos/create')]
    assert [f for f in local_hub.files(REPO) if f != '.gitattributes'] == sorted(UPLOAD_FILES)
    for name in UPLOAD_FILES:
        if name != 'README.md':  # the folder's card was last written for the branch (below)
            assert local_hub.read(REPO, name) == (tiny_folder / name).read_bytes()
    assert f"hf-hub:{REPO}'".encode() in local_hub.read(REPO, 'README.md')
    assert f'pushed {tiny_folder} to {local_hub.url}/{REPO}' in push

    # re-pushing identical files: preupload reports their oids, the client drops them, no commit is sent
    assert len(local_hub.commits(REPO)) == 2  # the repo's initial commit + the push
    assert sum(c == ('POST', f'/api/models/{REPO}/commit/main') for c in local_hub.requests) == 1
    assert 'already has these files: no new commit' in repush
    # the branch gets the same weights and a card whose hf-hub: calls load the branch: one commit there, main kept
    branches = local_hub.branches(REPO)
    assert branches['main'] == local_hub.commits(REPO)[0] and branches['v1'] != branches['main']
    assert 'no new commit' not in branch and not local_hub.is_private(REPO)
    assert local_hub.read(REPO, 'README.md', 'v1') == (tiny_folder / 'README.md').read_bytes()
    assert f"hf-hub:{REPO}@v1'".encode() in local_hub.read(REPO, 'README.md', 'v1')
    assert local_hub.read(REPO, 'model.safetensors', 'v1') == local_hub.read(REPO, 'model.safetensors')
    # the default commit message says what was recycled how; --private and --commit-message reach the Hub
    assert local_hub.titles(REPO)[0] == ('Upload v_jetmoe_tiny.recycled_in21k (predecessor=vit_small_patch16_224.'
                                         'augreg_in21k, method=importance, recipe=paper)')
    assert local_hub.is_private(REPO + '-private') and local_hub.titles(REPO + '-private')[0] == 'my own message'
    # a token the Hub rejects: one line naming the fix, and no branch made
    assert (f'jetmoe-timm push: error: The Hub at {local_hub.url} rejected the token (401): log in again with '
            f'`hf auth login` or fix HF_TOKEN.') in r.stderr and set(local_hub.branches(REPO)) == {'main', 'v1'}

    # load back in a fresh HF_HOME, without a token: by the cfg's hf_hub_id, by hf-hub: name, from local-dir:
    home = tmp_path / 'loader'
    tiny = json.loads((tiny_folder / 'config.json').read_text())['model_args']  # the pushed architecture
    r = _run(_LOAD.format(repo=REPO, home=str(home), tiny=tiny), _client_env(home, local_hub.url))
    assert set(json.loads(r.stdout.splitlines()[-1])['snapshot']) >= set(UPLOAD_FILES)
    for cache in ('c1', 'c2'):  # each load downloaded its own copy from the server
        assert list((home / cache).glob(f'models--jetmoe-test--{REPO.split("/")[1]}/snapshots/*/model.safetensors'))
    assert not (home / 'jetmoe_cache').exists()  # nothing was recycled locally
    loaded = safetensors.torch.load_file(home / 'loaded.safetensors')
    pushed = safetensors.torch.load_file(tiny_folder / 'model.safetensors')
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tiny_model(x)
    for way in ('hf_hub_id', 'hf_hub', 'local_dir'):
        for k, v in pushed.items():
            assert torch.equal(loaded[f'{way}/{k}'], v), (way, k)
        assert torch.equal(loaded[f'{way}/logits'], logits), way
    # img_size=48: every tensor pushed but the position grid, resampled from 8 x 8 to 12 x 12 patches
    assert loaded['img_size/pos_embed'].shape[1] == 1 + 12 * 12 and pushed['pos_embed'].shape[1] == 1 + 8 * 8
    assert all(torch.equal(loaded[f'img_size/{k}'], v) for k, v in pushed.items() if k != 'pos_embed')


# --- in-process: no network (HF_HUB_OFFLINE=1 from conftest) ---------------------------------------------

def test_card_renders_with_computed_figures(tiny_folder, tiny_model):
    card = render_model_card(tiny_folder, 'org/name')
    meta = _front_matter(card)
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert meta['datasets'] == ['imagenet-21k'] and {'timm', 'image-classification', 'jetmoe_timm'} <= set(meta['tags'])
    assert card.split('\n---\n', 1)[1].startswith(CARD_MARK) and '${' not in card
    assert '# Model card for v_jetmoe_tiny.recycled_in21k' in card
    assert f'Params (M): {count_params(tiny_model) / 1e6:.4g}' in card
    assert f'GMACs: {count_macs(tiny_model, (3, 32, 32)) / 1e9:.4g}' in card
    assert 'Image size: 32 x 32' in card and 'Classes: 10; features: 32' in card
    assert '2 x SpheroMoE (`blocks.2.mlp` ... `blocks.3.mlp`): 4 core experts (hidden 128) + 8 universal' in card
    assert '[vit_small_patch16_224.augreg_in21k](https://huggingface.co/timm/vit_small_patch16_224.augreg_in21k)' in card
    assert '**neuron selection:** `importance`' in card and '`synthetic` (16 images)' in card
    assert 'metadata' not in card  # no index selection was stored, so the card does not claim one
    assert 'https://arxiv.org/abs/2406.04801' in card and '@inproceedings{zhu2024moejetpack' in card
    usage = card[card.index('## Model Usage'):]
    assert usage.index('import jetmoe_timm') < usage.index("timm.create_model('hf-hub:org/name', pretrained=True)")
    assert 'features_only=True' in usage and 'forward_intermediates' in usage
    assert '--device-modules jetmoe_timm' in usage and 'torchrun --nproc_per_node=4 -m jetmoe_timm.train' in usage


def test_the_placeholders_a_template_is_checked_against_are_what_a_card_fills(tiny_folder):
    """push checks a template before converting, against CARD_PLACEHOLDERS; a card fills exactly those, and the
    docs list them all."""
    from jetmoe_timm.hub import _inspect_folder
    from jetmoe_timm.model_card import CARD_PLACEHOLDERS, _card_context
    name, config, model = _inspect_folder(tiny_folder)
    assert set(_card_context(name, config, model, 'org/name', tiny_folder, None, False)) == CARD_PLACEHOLDERS
    docs = (Path(__file__).resolve().parents[1] / 'docs' / 'hub.md').read_text()
    listed = docs[docs.index('### Card templates'):docs.index('## Loading')]
    assert {p for p in CARD_PLACEHOLDERS if f'`{p}`' not in listed} == set()


@pytest.mark.parametrize('arch', timm.list_models(['v_jetmoe_*', 'c_jetmoe_*']))
def test_every_registered_model_has_a_card_template(arch, tiny_folder):
    """One template per family serves each size, under the paper's name of the variant."""
    from jetmoe_timm.model_card import _display_name, template_of
    template, _ = template_of(arch, None)
    assert template == CARD_DIR / f"{arch.rpartition('_')[0]}.md"
    card = render_model_card(tiny_folder, 'org/name', template=template)  # every placeholder is a known one
    assert '${' not in card and _front_matter(card)['library_name'] == 'timm'
    assert _display_name(arch) == {'v_jetmoe_tiny': 'V-JetMoE-T', 'v_jetmoe_small': 'V-JetMoE-S',
                                   'c_jetmoe_femto': 'C-JetMoE-F', 'c_jetmoe_tiny': 'C-JetMoE-T'}[arch]
    assert 'A V-JetMoE-T image model' in card  # the tiny folder's own architecture names the card


def test_dry_run_writes_the_folder_and_sends_nothing(tiny_folder, local_hub, monkeypatch, capsys):
    monkeypatch.setenv('HF_TOKEN', local_hub.token)
    assert main(['push', '--from', str(tiny_folder), '--repo-id', 'org/name', '--endpoint', local_hub.url,
                 '--dry-run']) == 0
    out = capsys.readouterr().out
    assert f'would upload these files from {tiny_folder} to {local_hub.url}/org/name' in out
    for name in UPLOAD_FILES:
        assert f'{name:<18} {(tiny_folder / name).stat().st_size:>14,d} bytes' in out
    assert (tiny_folder / 'README.md').read_text() == render_model_card(tiny_folder, 'org/name')
    assert local_hub.requests == []


def test_a_card_template_serves_every_size_of_its_family():
    from jetmoe_timm.model_card import _family
    assert [_family(a) for a in ('v_jetmoe_tiny', 'c_jetmoe_femto', 'v_jetmoe_base_patch14')] == \
        ['v_jetmoe', 'c_jetmoe', 'v_jetmoe']


def test_card_at_a_tags_default_repo_names_the_tag(tiny_folder):
    """At the tag's own default repo the card's by-name call names the tag: the bare architecture loads the
    architecture's default tag, which is another repo for every other tag (the DeiT-3 ones)."""
    card = render_model_card(tiny_folder, 'jetmoe-timm/v_jetmoe_tiny.recycled_in21k')
    assert "`timm.create_model('v_jetmoe_tiny.recycled_in21k', pretrained=True)` downloads them as well" in card


def test_a_card_that_cannot_be_written_leaves_nothing_behind(tiny_folder, monkeypatch):
    import errno
    import jetmoe_timm.hub as hub

    def full_disk(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(hub.os, 'replace', full_disk)
    with pytest.raises(OSError, match='No space left'):
        push_to_hub(tiny_folder, 'org/name', dry_run=True)
    assert not list(tiny_folder.glob('.README.md.*'))  # a leftover would make the folder look like no model


def test_card_pushed_to_a_branch_loads_that_branch(tiny_folder):
    push_to_hub(tiny_folder, 'org/name', revision='v1', dry_run=True)
    card = (tiny_folder / 'README.md').read_text()
    assert "timm.create_model('hf-hub:org/name@v1', pretrained=True" in card and 'hf-hub:org/name\'' not in card


def test_hand_written_card_is_kept(tiny_folder, caplog):
    (tiny_folder / 'README.md').write_text('# my own card\n')
    push_to_hub(tiny_folder, 'org/name', dry_run=True)
    assert (tiny_folder / 'README.md').read_text() == '# my own card\n'
    assert 'Keeping the hand-written' in caplog.text


def test_missing_token_is_a_clear_error(tiny_folder, monkeypatch, capsys):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    assert main(['push', '--from', str(tiny_folder), '--repo-id', 'org/name']) == 2
    err = capsys.readouterr().err
    assert 'No Hugging Face token' in err and 'hf auth login' in err and 'HF_TOKEN' in err


def test_offline_is_a_clear_error(tiny_folder, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_anything')
    with pytest.raises(RuntimeError, match='HF_HUB_OFFLINE is set'):
        push_to_hub(tiny_folder, 'org/name')


def test_default_repo_refuses_weights_of_another_architecture(tiny_folder):
    default = get_pretrained_cfg('v_jetmoe_tiny').hf_hub_id
    assert default == 'jetmoe-timm/v_jetmoe_tiny.recycled_in21k'  # where create_model(pretrained=True) looks
    with pytest.raises(ValueError, match=f"{default} is the default repo of 'v_jetmoe_tiny.recycled_in21k'"):
        push_to_hub(tiny_folder, dry_run=True)  # --repo-id defaults to the tag's hf_hub_id


def test_bad_folders_are_clear_errors(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="holds 'v_jetmoe_tiny.recycled_in21k', not 'v_jetmoe_small'"):
        push_to_hub(tiny_folder, 'org/name', model_name='v_jetmoe_small', dry_run=True)
    config = json.loads((tiny_folder / 'config.json').read_text())
    config['model_args']['embed_dim'] = 64
    (tiny_folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match='does not fit the model its config.json describes'):
        push_to_hub(tiny_folder, 'org/name', dry_run=True)
    (tiny_folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='lacks model.safetensors'):
        push_to_hub(tiny_folder, 'org/name', dry_run=True)


def test_convert_then_push_dry_run(tmp_path, tiny_vit_kwargs, capsys):
    torch.manual_seed(0)
    dense = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=4, num_classes=10)
    save_for_hf(dense, tmp_path / 'dense', safe_serialization=True)
    out = tmp_path / 'out'
    kwargs = [f'{k}={v}' for k, v in tiny_vit_kwargs.items()]
    # without --repo-id the tag's default repo is the target: another architecture is refused before converting
    assert main(['push', 'v_jetmoe_tiny', '--out', str(out), '--dry-run', '--model-kwargs', *kwargs]) == 2
    assert 'pass your own --repo-id' in capsys.readouterr().err and not out.exists()
    assert main(['push', 'v_jetmoe_tiny', '--repo-id', 'org/name', '--out', str(out), '--dry-run', '--no-progress',
                 '--predecessor', f'local-dir:{tmp_path / "dense"}', '--num-calib', '8', '--method', 'uniform',
                 '--model-kwargs', *kwargs]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(UPLOAD_FILES)
    card = (out / 'README.md').read_text()
    assert '**neuron selection:** `uniform`' in card and "local checkpoint 'dense'" in card
    assert str(tmp_path) not in card  # a card never publishes a local path
    assert 'neurons of every expert are in the `model.safetensors` metadata' in card
    assert 'nothing was sent' in capsys.readouterr().out


def _builds_wheels_offline() -> bool:
    """Whether this interpreter can build the wheel without fetching anything (``--no-build-isolation``): setuptools
    brings its own bdist_wheel from 70.1 on, older ones need the wheel package."""
    import importlib.metadata
    import importlib.util
    import re
    try:
        version = importlib.metadata.version('setuptools')
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(n) for n in re.match(r'(\d+)(?:\.(\d+))?', version).groups(default='0'))
    return (major, minor) >= (70, 1) or importlib.util.find_spec('wheel') is not None


@pytest.mark.slow
def test_wheel_ships_the_model_cards(tmp_path, tiny_folder, local_hub):
    """Installed from its wheel (not editable), `jetmoe-timm push` finds its card templates from any folder."""
    if not _builds_wheels_offline():
        pytest.skip('building the wheel offline needs setuptools >= 70.1 or the wheel package in this environment '
                    '(pip install -U setuptools)')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w',
                            str(tmp_path / 'dist'), root], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / 'dist').glob('jetmoe_timm-*.whl')
    venv = tmp_path / 'venv'  # torch, timm, ... from this interpreter; jetmoe_timm from the wheel alone
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / 'bin' / 'python'), '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', str(wheel)],
                   check=True, capture_output=True, timeout=300)
    away = tmp_path / 'elsewhere'
    away.mkdir()
    env = _client_env(tmp_path / 'home', local_hub.url, HF_TOKEN=local_hub.token)
    where = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import jetmoe_timm; print(jetmoe_timm.__file__)'],
                           cwd=away, env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # not the source tree
    push = subprocess.run([str(venv / 'bin' / 'jetmoe-timm'), 'push', '--from', str(tiny_folder), '--repo-id',
                           'org/name', '--dry-run'], cwd=away, env=env, capture_output=True, text=True, timeout=300)
    assert push.returncode == 0, push.stderr[-2000:]
    card = (tiny_folder / 'README.md').read_text()
    assert card.startswith('---\n') and 'v_jetmoe_tiny' in card and '${' not in card


def test_card_and_config_describe_the_model_actually_converted(tmp_path, monkeypatch):
    """A 32 px, 32-wide variant recycled from a local folder: the card and config.json describe that model and
    that predecessor, not the registered default, and publish no local path."""
    from jetmoe_timm.recycle import convert
    torch.manual_seed(0)
    pred = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
    save_for_hf(pred, tmp_path / 'my_pred', safe_serialization=True)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=2, num_univ_experts=2)
    monkeypatch.chdir(tmp_path)
    out = convert('v_jetmoe_tiny', 'conv', model_kwargs=kw, predecessor='local-dir:my_pred', num_calib=4,
                  progress=False)
    card = render_model_card(out, 'me/mine')
    config = (out / 'config.json').read_text()
    assert 'a ViT with 4 blocks of width 32 (2 heads), patch 4 at 32 px' in card
    assert 'ViT-Tiny' not in card and 'imagenet-21k' not in card and 'vit_small_patch16_224.augreg_in21k' not in card
    assert "local checkpoint 'my_pred'" in card and "local checkpoint 'my_pred'" in config
    assert str(tmp_path) not in card and 'local-dir:my_pred' not in card
    notes = json.loads(config)['pretrained_cfg']['notes']
    assert "local checkpoint 'my_pred'" in ' '.join(notes) and 'augreg_in21k' not in ' '.join(notes)


# --- a repo the user names is their source; the tag's own repo falls back to recycling, saying why ---------

_TWIN = """
    import os, timm, torch, safetensors.torch
    from timm.models import generate_default_cfgs, register_model
    import jetmoe_timm
    from jetmoe_timm.models._pretrained import WeightsUnavailableError
    from jetmoe_timm.models.vit_jetmoe import _cfg, _create_vit_jetmoe
    from jetmoe_timm.recycle.build import RECYCLE_SOURCES
    torch.set_num_threads(2)
    tiny = {tiny!r}
    # a tiny twin of a registered tag whose own repo was never published; recycled from a local predecessor
    default_cfgs = generate_default_cfgs({{'v_jetmoe_hubtwin.recycled_in21k': _cfg(
        hf_hub_id='jetmoe-test/never-published', num_classes=10, input_size=(3, 32, 32))}})

    @register_model
    def v_jetmoe_hubtwin(pretrained=False, **kwargs):
        return _create_vit_jetmoe('v_jetmoe_hubtwin', pretrained=pretrained, model_args=dict(tiny), **kwargs)

    RECYCLE_SOURCES['v_jetmoe_hubtwin.recycled_in21k'] = dict(predecessor={pred!r})
    mine = safetensors.torch.load_file({weights!r})
"""

_GIVEN = _TWIN + """
    for hub_id in ('jetmoe-test/mine', 'jetmoe-test/mine-private', 'jetmoe-test/mien', 'jetmoe-test/mine@nope'):
        try:
            m = timm.create_model('v_jetmoe_hubtwin', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=hub_id))
        except WeightsUnavailableError as e:
            print('ERROR', str(e))
        else:
            print('LOADED', hub_id, all(torch.equal(v, mine[k]) for k, v in m.state_dict().items()))
    cfg = timm.models.get_pretrained_cfg('v_jetmoe_hubtwin.recycled_in21k').to_dict()
    try:  # the same given in a whole pretrained_cfg of the user's
        timm.create_model('v_jetmoe_hubtwin', pretrained=True, pretrained_cfg=dict(cfg, hf_hub_id='jetmoe-test/mien'))
    except WeightsUnavailableError as e:
        print('ERROR', str(e))
    assert not os.path.exists(os.environ['JETMOE_TIMM_CACHE'])  # nothing was recycled in place of the user's repo
    for _ in range(2):  # the tag's own repo: recycled, why said once
        m = timm.create_model('v_jetmoe_hubtwin', pretrained=True)
    print('RECYCLED', not torch.equal(m.blocks[0].attn.qkv.weight, mine['blocks.0.attn.qkv.weight']))
"""


@pytest.fixture
def dense_pred(tmp_path):
    torch.manual_seed(0)
    dense = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=4, num_classes=10)
    save_for_hf(dense, tmp_path / 'dense', safe_serialization=True)
    return f'local-dir:{tmp_path / "dense"}'


def test_a_repo_the_user_names_is_never_replaced_by_recycled_weights(tmp_path, local_hub, tiny_folder, dense_pred):
    code = ('from huggingface_hub import HfApi\napi = HfApi()\n'
            f"for repo, private in (('jetmoe-test/mine', False), ('jetmoe-test/mine-private', True)):\n"
            f"    api.create_repo(repo, private=private)\n"
            f"    api.upload_folder(repo_id=repo, folder_path={str(tiny_folder)!r})\n")
    _run(code, _client_env(tmp_path / 'pusher', local_hub.url, HF_TOKEN=local_hub.token))
    tiny = json.loads((tiny_folder / 'config.json').read_text())['model_args']
    r = _run(_GIVEN.format(tiny=tiny, pred=dense_pred, weights=str(tiny_folder / 'model.safetensors')),
             _client_env(tmp_path / 'loader', local_hub.url, JETMOE_TIMM_CALIB_IMAGES='4'))  # no token
    lines = r.stdout.splitlines()
    assert lines[0] == 'LOADED jetmoe-test/mine True'
    for line, repo, why in zip(lines[1:5], ('mine-private', 'mien', 'mine@nope', 'mien'), (
            'no such repo, or a private one and no token with access was sent; HTTP 401',
            'no such repo, or a private one and no token with access was sent; HTTP 404',
            'no such revision; HTTP 404',
            'no such repo, or a private one and no token with access was sent; HTTP 404')):
        assert line.startswith(f"ERROR Cannot get model.safetensors of the hf_hub_id 'jetmoe-test/{repo}' you gave "
                               f"({why}") and 'HF_TOKEN' in line, line
    assert lines[5] == 'RECYCLED True'
    told = [line for line in r.stderr.splitlines() if 'jetmoe-test/never-published' in line]
    assert told == ['No converted weights from jetmoe-test/never-published (no such repo, or a private one and no '
                    'token with access was sent; HTTP 404, RepositoryNotFoundError): recycling locally.'], r.stderr


_HF_HUB_CHECKS = """
    import glob, os, timm, jetmoe_timm
    def load(**kw):
        try:
            timm.create_model(kw.pop('name', 'hf-hub:jetmoe-test/pub'), pretrained=True, **kw)
        except ValueError as e:
            return str(e)
        return 'loaded'
    c2 = {c2!r}
    print(load(name='hf-hub:jetmoe-test/bad'))  # damaged on the Hub: refused on its first download
    print(load(cache_dir=c2))
    (blob,) = [p for p in glob.glob(c2 + '/models--jetmoe-test--pub/blobs/*') if os.path.getsize(p) > 10000]
    raw = bytearray(open(blob, 'rb').read()); raw[-5] ^= 0x10; open(blob, 'wb').write(bytes(raw))
    print(load(cache_dir=c2))  # damaged in cache_dir: refused, though the default cache has no copy
    print(load())  # the default cache: a fresh, intact download
"""


def test_hf_hub_loads_verify_the_file_timm_loads(tmp_path, local_hub, tiny_folder):
    """hf-hub: names: the model.safetensors timm will load (first download, or the copy in cache_dir=) is checked
    against its content checksum."""
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in ('config.json', 'model.safetensors'):
        (bad / name).write_bytes((tiny_folder / name).read_bytes())
    raw = bytearray((bad / 'model.safetensors').read_bytes())
    raw[-5] ^= 0x10
    (bad / 'model.safetensors').write_bytes(bytes(raw))
    code = ('from huggingface_hub import HfApi\napi = HfApi()\n'
            f"for repo, folder in (('jetmoe-test/pub', {str(tiny_folder)!r}), ('jetmoe-test/bad', {str(bad)!r})):\n"
            f"    api.create_repo(repo)\n"
            f"    api.upload_folder(repo_id=repo, folder_path=folder)\n")
    _run(code, _client_env(tmp_path / 'pusher', local_hub.url, HF_TOKEN=local_hub.token))
    r = _run(_HF_HUB_CHECKS.format(c2=str(tmp_path / 'c2')), _client_env(tmp_path / 'loader', local_hub.url))
    first_bad, first, damaged, default = r.stdout.splitlines()
    assert first_bad.startswith('Refusing to load damaged weights: ') and 'models--jetmoe-test--bad' in first_bad
    assert 'content checksum' in first_bad
    assert first == 'loaded' and default == 'loaded'
    assert damaged.startswith(f'Refusing to load damaged weights: {tmp_path / "c2"}/models--jetmoe-test--pub/')


def test_push_refuses_damaged_or_unbuildable_folders_in_one_line(tiny_folder, tmp_path, capsys):
    """Each answered with one line naming the file and the fix, before a card is written or anything is sent."""
    def push(folder):
        assert main(['push', '--from', str(folder), '--repo-id', 'org/name', '--dry-run']) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
        assert not (folder / 'README.md').exists()
        return err

    def copy(name):
        d = tmp_path / name
        d.mkdir()
        for f in ('config.json', 'model.safetensors'):
            (d / f).write_bytes((tiny_folder / f).read_bytes())
        return d

    flipped = copy('flipped')  # one flipped bit: keys and shapes still fit
    raw = bytearray((flipped / 'model.safetensors').read_bytes())
    raw[-5] ^= 0x10
    (flipped / 'model.safetensors').write_bytes(bytes(raw))
    assert (f'Not pushing damaged weights: {flipped}/model.safetensors does not match its content checksum'
            in push(flipped))
    garbage = copy('garbage')
    (garbage / 'model.safetensors').write_bytes(os.urandom(3000))
    assert f'{garbage}/model.safetensors is not a complete safetensors file' in push(garbage)
    unchecked = copy('unchecked')  # not written by jetmoe_timm.export: nothing vouches for its bytes
    safetensors.torch.save_file(safetensors.torch.load_file(tiny_folder / 'model.safetensors'),
                                unchecked / 'model.safetensors')
    said = push(unchecked)
    assert 'Not pushing unverified weights' in said and 'has no content checksum' in said and \
        'save_pretrained_folder' in said
    typo = copy('typo')
    config = json.loads((typo / 'config.json').read_text())
    config['model_args']['embed_dimm'] = 32
    (typo / 'config.json').write_text(json.dumps(config))
    err = push(typo)
    assert f"{typo}/config.json does not describe a buildable 'v_jetmoe_tiny'" in err and 'embed_dimm' in err
    partial = copy('partial')  # provenance the card needs is missing: the folder's fault, not the template's
    config = json.loads((partial / 'config.json').read_text())
    config['jetmoe'] = dict(method='importance', retention=dict(cka=1.0))
    (partial / 'config.json').write_text(json.dumps(config))
    err = push(partial)
    assert f'{partial}/config.json lacks what the model card is made from (its provenance under "jetmoe", ' \
           f'pretrained_cfg, model_args; KeyError' in err
    assert 'template' not in err


def test_published_files_hold_no_local_path(tmp_path):
    """Converted from a local predecessor with a local calibration folder: config.json, the safetensors metadata and
    the card name the predecessor ``local checkpoint 'NAME'`` (no Hub link, even for a dotted name), never a path."""
    from PIL import Image
    from jetmoe_timm.export import read_provenance
    from jetmoe_timm.recycle import convert
    torch.manual_seed(0)
    pred = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
    save_for_hf(pred, tmp_path / 'secret.pred', safe_serialization=True)
    (tmp_path / 'calib').mkdir()
    for i in range(4):
        pixels = torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / 'calib' / f'{i}.png')
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_core_experts=2, num_univ_experts=2)
    out = convert('v_jetmoe_tiny', tmp_path / 'conv', model_kwargs=kw,
                  predecessor=f'local-dir:{tmp_path / "secret.pred"}', calib=str(tmp_path / 'calib'), num_calib=4,
                  progress=False)
    push_to_hub(out, 'me/mine', dry_run=True)
    prov = read_provenance(out / 'model.safetensors')
    assert prov['predecessor'] == "local checkpoint 'secret.pred'" and prov['calibration'].startswith('folder:calib')
    assert json.loads((out / 'config.json').read_text())['jetmoe']['predecessor'] == "local checkpoint 'secret.pred'"
    header = (out / 'model.safetensors').read_bytes()[:1 << 20]
    for name in UPLOAD_FILES:
        data = header if name == 'model.safetensors' else (out / name).read_bytes()
        assert str(tmp_path).encode() not in data, name
    card = (out / 'README.md').read_text()
    assert "local checkpoint 'secret.pred'" in card and 'huggingface.co/timm/' not in card


@pytest.mark.parametrize('args, env, why', [
    (['--repo-id', 'org/name'], {}, 'No Hugging Face token'),
    (['--repo-id', 'org/name'], dict(HF_TOKEN='hf_anything'), 'HF_HUB_OFFLINE is set'),  # conftest: offline
    (['--repo-id', 'org/bad name', '--dry-run'], {}, "--repo-id 'org/bad name' is not a valid Hub repo id"),
    (['--repo-id', 'org', '--dry-run'], {}, '--repo-id must look like ORG/NAME'),
    (['--repo-id', 'org/name', '--dry-run', '--card-template', 'nowhere.md'], {}, 'No model card template at'),
], ids=['no-token', 'offline', 'bad-repo-id', 'no-slash', 'no-template'])
def test_push_model_refuses_before_converting(args, env, why, tmp_path, monkeypatch, capsys):
    """Whatever would refuse the upload refuses `push MODEL` before the conversion: --out is never written, so the
    fixed command runs at once (the predecessor does not even exist: converting would fail on it instead)."""
    for k in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN'):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / 'out'
    assert main(['push', 'v_jetmoe_tiny', '--out', str(out), '--no-progress', '--predecessor',
                 f'local-dir:{tmp_path / "missing"}', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1 and 'missing' not in err, err
    assert not out.exists()


@pytest.mark.parametrize('args, named', [
    (['--predecessor', 'local-dir:elsewhere'], 'not predecessor=local-dir:elsewhere'),
    (['--method', 'graph'], 'not method=graph'),
    (['--recipe', 'official'], 'not recipe=official'),
])
def test_the_tags_default_repo_takes_only_the_tags_own_recycling(args, named, tmp_path, capsys):
    """Without --repo-id, push targets the tag's default repo, which create_model(name, pretrained=True) downloads
    and whose cfg promises the tag's predecessor, importance sampling and the paper recipe: anything else is
    refused before converting (and a folder of such weights before uploading)."""
    out = tmp_path / 'out'
    assert main(['push', 'v_jetmoe_tiny', '--out', str(out), '--no-progress', '--dry-run', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and 'your own --repo-id ORG/NAME' in err, err
    assert "default repo of 'v_jetmoe_tiny.recycled_in21k' holds weights recycled from " \
           "vit_small_patch16_224.augreg_in21k" in err and not out.exists()
    from jetmoe_timm.hub import default_repo_problem
    own = dict(predecessor='vit_small_patch16_224.augreg_in21k', method='importance', recipe='paper', seed=3)
    assert default_repo_problem('v_jetmoe_tiny.recycled_in21k', own) is None
    assert 'not predecessor=local checkpoint' in default_repo_problem(
        'v_jetmoe_tiny.recycled_in21k', dict(own, predecessor="local checkpoint 'pred'"))


def test_push_model_refuses_an_unreachable_hub_before_converting(tmp_path, monkeypatch, capsys):
    """Online, with a token, and nothing answering at the endpoint: one line before the conversion (was: after it,
    leaving a whole --out behind)."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_TOKEN', 'hf_anything')
    out, dead = tmp_path / 'out', _dead_endpoint()
    assert main(['push', 'v_jetmoe_tiny', '--out', str(out), '--no-progress', '--repo-id', 'org/name', '--endpoint',
                 dead, '--predecessor', f'local-dir:{tmp_path / "missing"}']) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'jetmoe-timm push: error: Cannot reach the Hub at {dead} (nothing answers): check the network, '
                   f'or HF_ENDPOINT / --endpoint (or use --dry-run to only write the folder).')
    assert not out.exists()
    # an endpoint without its scheme would send the probe to this machine (port 80), not to the host named
    bare = dead.split('://')[1]
    for endpoint in (bare, f'ftp://{bare}'):  # or with another scheme
        assert main(['push', 'v_jetmoe_tiny', '--out', str(out), '--no-progress', '--repo-id', 'org/name',
                     '--endpoint', endpoint]) == 2
        assert capsys.readouterr().err.strip() == (
            f"jetmoe-timm push: error: endpoint '{endpoint}' (--endpoint or HF_ENDPOINT) is no http(s) URL: give "
            f"https://{bare} (or http:// for a local server).")
    assert not out.exists()


def test_reachability_probe_goes_where_the_client_goes(monkeypatch):
    """The Hub probe connects where huggingface_hub's client would: through the proxy the environment names, unless
    NO_PROXY exempts the host (a direct probe would refuse a push that the proxy carries)."""
    from jetmoe_timm.hub_access import _probe_address
    for k in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy', 'NO_PROXY', 'no_proxy', 'HTTP_PROXY', 'http_proxy'):
        monkeypatch.delenv(k, raising=False)
    assert _probe_address('https://huggingface.co') == ('huggingface.co', 443)
    assert _probe_address('http://127.0.0.1:8123') == ('127.0.0.1', 8123)
    monkeypatch.setenv('HTTPS_PROXY', 'http://proxy.example:3128')
    assert _probe_address('https://huggingface.co') == ('proxy.example', 3128)
    monkeypatch.setenv('NO_PROXY', 'huggingface.co')
    assert _probe_address('https://huggingface.co') == ('huggingface.co', 443)
