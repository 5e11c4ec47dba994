"""Reliability of the weights pipeline: cache integrity, interrupted and concurrent builds, bad inputs, numerics.

Multi-process tests fork their loaders from one "zygote" interpreter that imported timm once and never ran a
torch op (forking after torch has computed can deadlock its OpenMP pool): each child is a real, separate process
with its own file lock, and they start within milliseconds of each other, which makes the races real. The
zygote talks to a local Hub stand-in (tests/hub_server.py); nothing reaches the internet.
"""
import contextlib
import hashlib
import json
import os
import re
import stat
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from filelock import FileLock, Timeout
from PIL import Image
from timm.models import save_for_hf

from hub_server import LocalHub
from jetmoe_timm.export import CHECKSUM_KEY, read_provenance, save_pretrained_folder, save_safetensors_atomic, \
    verify_safetensors
from jetmoe_timm.hub import push_to_hub
from jetmoe_timm.layers import SpheroMoE
from jetmoe_timm.recycle import convert

TAG = 'v_jetmoe_tiny.recycled_in21k'
PRED_KWARGS = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
SUCC_KWARGS = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_core_experts=4,
                   num_univ_experts=6)
TIMEOUT_S = 180


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope='module')
def pred_dir(tmp_path_factory):
    """A tiny dense ViT predecessor as a 'local-dir:' folder."""
    d = tmp_path_factory.mktemp('pred') / 'vit'
    save_for_hf(_randomize(timm.create_model('vit_small_patch16_224', **PRED_KWARGS), 0), d, safe_serialization=True)
    return d


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob('*'))


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    """Flip one bit in the tensor data (the end of a safetensors file is data)."""
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(raw))


def _digest(state_dict) -> str:
    """Digest of the weights, the (num_classes-dependent) head left out."""
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        if not k.startswith('head.'):
            h.update(v.contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --- 1. cache integrity ----------------------------------------------------------------------------------

def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors header in place (same data), e.g. to swap a tensor's shape: a well-formed file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(',', ':')).encode()
    new += b' ' * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, 'little') + new + raw[8 + n:])


def test_save_handles_shared_views_and_transposed_tensors(tmp_path):
    """Tied weights, views and non-contiguous tensors are copied for safetensors (which rejects them); the file
    round-trips exactly and the caller's tensors are untouched."""
    from safetensors.torch import load_file
    base = torch.randn(4, 6)
    sd = dict(plain=torch.randn(3, 3), tied1=base, tied2=base, row_view=base[1:3], transposed=torch.randn(5, 2).t(),
              empty=torch.zeros(0, 2))
    before = {k: v.clone() for k, v in sd.items()}
    path = save_safetensors_atomic(sd, tmp_path / 'w.safetensors')
    verify_safetensors(path, require_checksum=True)
    back = load_file(str(path))
    assert set(back) == set(sd)
    for k in sd:
        torch.testing.assert_close(back[k], before[k], rtol=0, atol=0)
        torch.testing.assert_close(sd[k], before[k], rtol=0, atol=0)


def test_checksum_catches_every_kind_of_damage(tmp_path):
    sd = dict(a=torch.randn(4, 8), b=torch.randn(3).bfloat16(), c=torch.arange(5), d=torch.tensor([True, False]),
              e=torch.tensor(2.5), f=torch.zeros(0, 3), g=torch.randn(6).half())
    good = save_safetensors_atomic(sd, tmp_path / 'w.safetensors', dict(model='x'))
    meta = verify_safetensors(good, require_checksum=True)
    assert len(meta[CHECKSUM_KEY]) == 64 and read_provenance(good) == dict(model='x')
    assert [p.name for p in tmp_path.iterdir()] == ['w.safetensors']  # no temporary file left
    size = good.stat().st_size

    def damaged(name, damage):
        p = tmp_path / name
        p.write_bytes(good.read_bytes())
        damage(p)
        return p

    cases = {
        'flipped data bit': (lambda p: _flip_byte(p), 'content checksum'),
        'flipped first data byte': (lambda p: _flip_byte(p, offset_from_end=size - 8 - int.from_bytes(
            good.read_bytes()[:8], 'little')), 'content checksum'),
        'truncated by one byte': (lambda p: os.truncate(p, size - 1), 'truncated'),
        'truncated to half': (lambda p: os.truncate(p, size // 2), 'truncated'),
        'truncated in the header': (lambda p: os.truncate(p, 20), 'not a complete safetensors'),
        'empty file': (lambda p: os.truncate(p, 0), 'not a complete safetensors'),
        'trailing data': (lambda p: p.write_bytes(p.read_bytes() + b'\0' * 8), 'trailing data'),
        'swapped shape': (lambda p: _rewrite_header(p, lambda h: h['a'].update(shape=[8, 4])), 'content checksum'),
        'changed dtype': (lambda p: _rewrite_header(p, lambda h: h['c'].update(dtype='F64')), 'content checksum'),
        'renamed tensor': (lambda p: _rewrite_header(p, lambda h: h.update(z=h.pop('a'))), 'content checksum'),
        'damaged header json': (lambda p: p.write_bytes(p.read_bytes()[:8] + b'x' + p.read_bytes()[9:]),
                                'damaged safetensors header'),
    }
    for i, (name, (damage, match)) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=match):
            verify_safetensors(damaged(f'{i}.safetensors', damage))
    # safetensors itself loads a flipped or reshaped file without a word: the checksum is what catches it
    assert not torch.equal(safetensors.torch.load_file(damaged('x.safetensors', _flip_byte))['g'], sd['g'])
    assert safetensors.torch.load_file(damaged('y.safetensors', cases['swapped shape'][0]))['a'].shape == (8, 4)
    # a file written by someone else has no checksum: structure is checked, the checksum only on demand
    safetensors.torch.save_file(sd, tmp_path / 'plain.safetensors')
    verify_safetensors(tmp_path / 'plain.safetensors')
    with pytest.raises(ValueError, match='no content checksum'):
        verify_safetensors(tmp_path / 'plain.safetensors', require_checksum=True)


def test_damaged_or_foreign_cache_is_reported_once_and_rebuilt(tmp_path, pred_dir, monkeypatch, caplog):
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{pred_dir}')
    monkeypatch.setenv('JETMOE_TIMM_CALIB', 'weights')  # data-free statistics: quick rebuilds
    caplog.set_level('INFO', logger='jetmoe_timm')

    def load():
        return _digest(timm.create_model('v_jetmoe_tiny', pretrained=True, num_classes=10, **SUCC_KWARGS).state_dict())

    expected = load()
    (path,) = (tmp_path / 'cache').rglob('*.safetensors')
    original = path.read_bytes()
    checksum = verify_safetensors(path)[CHECKSUM_KEY]

    def tensors(p):
        return {k: v.clone() for k, v in safetensors.torch.load_file(p).items()}

    def foreign(p):  # a sound file, but built for another request (another model, recipe or version)
        save_safetensors_atomic(tensors(p), p, dict(read_provenance(p), cache_key='0' * 16, recipe='official'))

    def unsigned(p):  # a complete file without a checksum (e.g. written by an older version)
        safetensors.torch.save_file(tensors(p), p, metadata={'jetmoe': json.dumps(read_provenance(p))})

    damages = dict(flipped=_flip_byte, truncated=lambda p: os.truncate(p, len(original) // 2), foreign=foreign,
                   unsigned=unsigned, empty=lambda p: os.truncate(p, 0))
    for name, damage in damages.items():
        damage(path)
        assert path.read_bytes() != original
        caplog.clear()
        assert load() == expected, name  # the damaged tensors are never loaded
        warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
                    and not r.getMessage().startswith('Recycling')]  # the build's own announcement aside
        assert len(warnings) == 1 and str(path) in warnings[0] and 'Rebuilding' in warnings[0], (name, warnings)
        assert sum('Recycling' in r.getMessage() for r in caplog.records) == 1, name
        assert verify_safetensors(path)[CHECKSUM_KEY] == checksum, name  # rebuilt: the very same tensors
    caplog.clear()
    assert load() == expected and not caplog.records  # a sound file: silent, no rebuild
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + '.lock']


# --- the zygote: forked loader processes ------------------------------------------------------------------

_ZYGOTE = r'''
import json, logging, os, sys, traceback, types
import torch, timm, jetmoe_timm  # imported once; no torch op runs here, so forking stays safe

def child(cmd, i):
    os.environ.update(cmd.get('env') or {})
    torch.set_num_threads(1)
    log = os.path.join(cmd['dir'], f'{cmd["tag"]}{i}.log')
    sys.stdout = sys.stderr = open(log, 'a', buffering=1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
    logging.captureWarnings(True)
    module = types.ModuleType('__child__')  # a real module: timm's register_model looks its default_cfgs up
    module.__dict__.update(i=i, out={}, os=os)
    sys.modules['__child__'] = module
    try:
        exec(cmd['code'], module.__dict__)
        with open(os.path.join(cmd['dir'], f'{cmd["tag"]}{i}.json'), 'w') as f:
            json.dump(module.out, f)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)

for line in sys.stdin:
    cmd = json.loads(line)
    pids = []
    for i in range(cmd['n']):
        pid = os.fork()
        if pid == 0:
            child(cmd, i)
        pids.append(pid)
    print(json.dumps(dict(pids=pids)), flush=True)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    print(json.dumps(dict(exit=codes)), flush=True)
'''

# a loader: waits for the start signal (if any), loads the model with pretrained=True, reports a digest
_LOAD = r'''
import ast, hashlib, os, time, timm, torch
go = os.environ.get('GO_FILE')
while go and not os.path.exists(go):
    time.sleep(0.01)
m = timm.create_model(os.environ.get('MODEL', 'v_jetmoe_tiny'), pretrained=True, num_classes=3,
                      **ast.literal_eval(os.environ.get('MODEL_KWARGS', '{}')))
h = hashlib.sha256()
for k, v in sorted(m.state_dict().items()):
    if not k.startswith('head.'):
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy())
out['digest'] = h.hexdigest()
'''


class Zygote:
    """A Python process that imported timm once and forks loader children on request."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, '-c', _ZYGOTE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._pending = []  # children started and not yet collected

    def _line(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise TimeoutError(f'zygote gave no answer in {timeout} s')
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f'zygote died (rc={self.proc.poll()})')
        return json.loads(line)

    def start(self, code, workdir, n=1, env=None, tag='child'):
        """Fork ``n`` children running ``code``; returns their pids (call ``finish`` next)."""
        if self._pending:  # a failed test left its children behind
            self.abort()
        self._workdir, self._tag = Path(workdir), tag
        self._workdir.mkdir(parents=True, exist_ok=True)
        cmd = dict(code=textwrap.dedent(code), dir=str(workdir), n=n, env=env or {}, tag=tag)
        self.proc.stdin.write(json.dumps(cmd) + '\n')
        self.proc.stdin.flush()
        self._pending = self._line(TIMEOUT_S)['pids']  # the first command also waits for the zygote's imports
        return self._pending

    def finish(self, timeout=TIMEOUT_S):
        """Exit codes (-9: SIGKILL), results (None for a child that failed) and logs of the children."""
        codes = self._line(timeout)['exit']
        self._pending = []
        results, logs = [], []
        for i in range(len(codes)):
            res = self._workdir / f'{self._tag}{i}.json'
            results.append(json.loads(res.read_text()) if res.exists() else None)
            log = self._workdir / f'{self._tag}{i}.log'
            logs.append(log.read_text() if log.exists() else '')
        return codes, results, logs

    def run(self, code, workdir, n=1, env=None, tag='child', timeout=TIMEOUT_S):
        self.start(code, workdir, n, env, tag)
        return self.finish(timeout)

    def abort(self):
        for pid in self._pending:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.finish(30)

    def close(self):
        if self._pending:
            self.abort()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope='module')
def local_hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp('hub'), max_lifetime_s=600) as hub:
        yield hub


@pytest.fixture(scope='module')
def zygote(tmp_path_factory, local_hub):
    home = tmp_path_factory.mktemp('zygote_home')
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN')}
    env.update(HF_ENDPOINT=local_hub.url, HF_HOME=str(home / 'hf'), HF_HUB_OFFLINE='0', HF_HUB_DISABLE_XET='1',
               HF_HUB_DISABLE_TELEMETRY='1', OMP_NUM_THREADS='1')
    z = Zygote(env)
    yield z
    z.close()


def _load_env(tmp_path, pred_dir, **extra):
    return dict(JETMOE_TIMM_CACHE=str(tmp_path / 'cache'), JETMOE_TIMM_PREDECESSOR=f'local-dir:{pred_dir}',
                JETMOE_TIMM_CALIB_IMAGES='8', MODEL_KWARGS=repr(SUCC_KWARGS), **extra)


def _cache_files(tmp_path):
    return sorted((tmp_path / 'cache' / TAG).glob('*')) if (tmp_path / 'cache' / TAG).exists() else []


def _accepted(tmp_path):
    """Cache files a later load would accept."""
    out = []
    for p in _cache_files(tmp_path):
        if p.name.endswith('.safetensors') and not p.name.startswith('.'):
            try:
                verify_safetensors(p, require_checksum=True)
                out.append(p)
            except ValueError:
                pass
    return out


# --- 2. interrupted builds -------------------------------------------------------------------------------

_DIE_IN_STATISTICS = r'''
import time
from pathlib import Path
from jetmoe_timm.recycle import stats
def hang(self, x):  # the build holds the lock and is collecting statistics: tell the test, then wait to be killed
    Path(os.environ['MARKER']).touch()
    time.sleep(600)
stats._Accumulator.update = hang
'''

_DIE_IN_WRITE = r'''
import signal, safetensors.torch
real_save = safetensors.torch.save_file
def save_and_die(tensors, filename, metadata=None):  # the process dies with half the file written
    real_save(tensors, filename, metadata=metadata)
    os.truncate(filename, os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_and_die
'''

_DIE_BEFORE_RENAME = r'''
import signal
real_replace = os.replace
def die(src, dst):  # the temporary file is complete, the rename never happens
    if str(dst).endswith('.safetensors'):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = die
'''


def test_killed_builds_leave_nothing_a_load_accepts(tmp_path, pred_dir, zygote):
    env = _load_env(tmp_path, pred_dir, MARKER=str(tmp_path / 'in_statistics'))

    # SIGKILL from outside while the build holds the lock and collects statistics
    (pid,) = zygote.start(_DIE_IN_STATISTICS + _LOAD, tmp_path / 'run', env=env, tag='stats')
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / 'in_statistics').exists():
        assert time.monotonic() < deadline, 'the build never reached its statistics'
        time.sleep(0.05)
    lock = next(p for p in _cache_files(tmp_path) if p.name.endswith('.lock'))
    with pytest.raises(Timeout):  # the build holds the lock ...
        FileLock(str(lock), timeout=0.2).acquire()
    os.kill(pid, signal.SIGKILL)
    codes, _, _ = zygote.finish()
    assert codes == [-signal.SIGKILL]
    assert _cache_files(tmp_path) == [lock]  # nothing but the (empty) lock file
    stale = FileLock(str(lock), timeout=5)  # ... and the OS released it when the holder died
    stale.acquire()
    stale.release()

    # SIGKILL half-way through writing, and between writing and the rename
    for tag, code in (('write', _DIE_IN_WRITE), ('rename', _DIE_BEFORE_RENAME)):
        codes, _, logs = zygote.run(code + _LOAD, tmp_path / 'run', env=env, tag=tag)
        assert codes == [-signal.SIGKILL], logs[0][-3000:]
        temps = [p for p in _cache_files(tmp_path) if p.is_dir()]  # the writer's folder, with what it wrote
        assert len(temps) == 1 and not _accepted(tmp_path), tag  # which no load ever reads
        assert logs[0].count('left by an interrupted build') == (tag == 'rename')  # the write's, removed

    # the next load rebuilds without waiting, removes the leftover and writes one sound file
    codes, results, logs = zygote.run(_LOAD, tmp_path / 'run', env=env, tag='after')
    assert codes == [0], logs[0][-3000:]
    assert logs[0].count('Recycling') == 1 and logs[0].count('left by an interrupted build') == 1
    assert 'Waiting for another process' not in logs[0]
    (path,) = _accepted(tmp_path)
    assert [p.name for p in _cache_files(tmp_path)] == [path.name, lock.name]
    codes, again, logs = zygote.run(_LOAD, tmp_path / 'run', env=env, tag='again')
    assert codes == [0] and again[0] == results[0] and 'Recycling' not in logs[0]


# --- 3. concurrency --------------------------------------------------------------------------------------

_RANK = r'''
import json, logging, os, sys
import torch.distributed as dist
rank = int(os.environ['RANK'])
workdir = sys.argv[1]
sys.stdout = sys.stderr = open(os.path.join(workdir, f'rank{rank}.log'), 'a', buffering=1)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)
dist.init_process_group('gloo')
import torch, timm, jetmoe_timm
open(os.path.join(workdir, f'ready{rank}'), 'w').close()
out = {}
exec(open(os.path.join(workdir, 'load.py')).read())
digests = [None] * dist.get_world_size()
dist.all_gather_object(digests, out['digest'])  # the ranks hold identical weights
out['all_ranks'] = digests
with open(os.path.join(workdir, f'rank{rank}.json'), 'w') as f:
    json.dump(out, f)
dist.barrier()  # neither rank tears gloo down while the other still talks to it
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo's threads can abort() there ("terminate called without...")
'''


def _rank_logs(work):
    """What the ranks wrote (torchrun's own output only says which rank failed, not why)."""
    return '\n'.join(p.read_text()[-1500:] for p in sorted(work.glob('rank*.log')))


def test_four_processes_and_two_torchrun_ranks_build_once(tmp_path, pred_dir, zygote):
    work = tmp_path / 'run'
    work.mkdir()
    (work / 'load.py').write_text(_LOAD)
    (work / 'rank.py').write_text(_RANK)
    go = tmp_path / 'go'
    env = _load_env(tmp_path, pred_dir, GO_FILE=str(go))
    torchrun = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(work / 'rank.py'),
         str(work)], env=dict(os.environ, **env, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        zygote.start(_LOAD, work, n=4, env=env, tag='proc')
        deadline = time.monotonic() + TIMEOUT_S
        while not all((work / f'ready{r}').exists() for r in range(2)):  # the ranks are up (imports are slow)
            assert torchrun.poll() is None, _rank_logs(work) or torchrun.communicate()[0][-3000:]
            assert time.monotonic() < deadline, 'torchrun ranks never came up'
            time.sleep(0.05)
        go.touch()  # all six processes ask for the model at once
        codes, results, logs = zygote.finish()
        out, _ = torchrun.communicate(timeout=TIMEOUT_S)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
    assert codes == [0] * 4, [log[-2000:] for log in logs]
    assert torchrun.returncode == 0, _rank_logs(work) or out[-3000:]
    ranks = [json.loads((work / f'rank{r}.json').read_text()) for r in range(2)]
    logs += [(work / f'rank{r}.log').read_text() for r in range(2)]
    digests = {r['digest'] for r in results + ranks} | set(ranks[0]['all_ranks'])
    assert len(digests) == 1  # identical tensors everywhere
    assert sum(log.count(f'Recycling {TAG}') for log in logs) == 1  # built once
    (path,) = _accepted(tmp_path)
    assert [p.name for p in _cache_files(tmp_path)] == [path.name, path.name + '.lock']

    # a damaged cache, four processes at once: one of them reports and rebuilds, the others wait and read it
    _flip_byte(path)
    codes, results2, logs = zygote.run(_LOAD, work, n=4, env=dict(env, GO_FILE=''), tag='again')
    assert codes == [0] * 4, [log[-2000:] for log in logs]
    assert {r['digest'] for r in results2} == digests
    assert sum(log.count('Not using cached weights') for log in logs) == 1
    assert sum(log.count(f'Recycling {TAG}') for log in logs) == 1
    assert _accepted(tmp_path) == [path]


# --- 1b. a damaged Hub-cache file: downloaded again, or recycled offline ---------------------------------

_HUB_TWIN = r'''
import ast
from timm.models import generate_default_cfgs, register_model
from jetmoe_timm.models.vit_jetmoe import _cfg, _create_vit_jetmoe
from jetmoe_timm.recycle.build import RECYCLE_SOURCES
# the registered v_jetmoe_tiny is 265 M parameters: a tiny twin whose default cfg points at the test repo
default_cfgs = generate_default_cfgs({'v_jetmoe_reltest.pushed': _cfg(hf_hub_id=os.environ['REPO'], num_classes=10,
                                                                      input_size=(3, 32, 32))})
@register_model
def v_jetmoe_reltest(pretrained=False, **kwargs):
    twin = ast.literal_eval(os.environ['TWIN'])
    return _create_vit_jetmoe('v_jetmoe_reltest', pretrained=pretrained, model_args=twin, **kwargs)
RECYCLE_SOURCES['v_jetmoe_reltest.pushed'] = dict(predecessor=os.environ['PRED'])
if os.environ.get('OFFLINE'):
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
'''


def test_damaged_hub_cache_is_downloaded_again_or_recycled(tmp_path, pred_dir, zygote, local_hub):
    repo = 'jetmoe-test/reliability'
    torch.manual_seed(0)
    pushed = timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS).eval()
    folder = save_pretrained_folder(pushed, tmp_path / 'converted', dict(method='importance'))
    code = ('from huggingface_hub import HfApi\n'
            f'api = HfApi(token={local_hub.token!r})\n'
            f'api.create_repo({repo!r})\n'
            f'api.upload_folder(repo_id={repo!r}, folder_path={str(folder)!r})\n')
    codes, _, logs = zygote.run(code, tmp_path / 'run', tag='upload')
    assert codes == [0], logs[0][-3000:]
    twin = json.loads((folder / 'config.json').read_text())['model_args']  # the pushed architecture
    env = dict(REPO=repo, TWIN=repr(twin), PRED=f'local-dir:{pred_dir}', MODEL='v_jetmoe_reltest',
               JETMOE_TIMM_CACHE=str(tmp_path / 'cache'), JETMOE_TIMM_CALIB_IMAGES='8')
    load = _HUB_TWIN + _LOAD.replace('num_classes=3,', f'num_classes=10, cache_dir={str(tmp_path / "hf")!r},')
    expected = _digest(pushed.state_dict())

    def downloads():
        return sum(m == 'GET' and p.endswith('/model.safetensors') for m, p in local_hub.requests)

    codes, results, logs = zygote.run(load, tmp_path / 'run', env=env, tag='first')
    assert codes == [0], logs[0][-3000:]
    assert results[0]['digest'] == expected and downloads() == 1
    (blob,) = [p for p in (tmp_path / 'hf').rglob('*') if p.parent.name == 'blobs']
    assert blob.read_bytes() == (folder / 'model.safetensors').read_bytes()

    _flip_byte(blob)  # damaged in the HF cache: reported once, downloaded again
    codes, results, logs = zygote.run(load, tmp_path / 'run', env=env, tag='flipped')
    assert codes == [0], logs[0][-3000:]
    assert results[0]['digest'] == expected and downloads() == 2
    assert logs[0].count('are damaged') == 1 and 'downloading them again' in logs[0]
    assert blob.read_bytes() == (folder / 'model.safetensors').read_bytes()

    os.truncate(blob, blob.stat().st_size // 3)  # damaged again, and offline: recycled locally instead
    codes, results, logs = zygote.run(load, tmp_path / 'run', env=dict(env, OFFLINE='1'), tag='offline')
    assert codes == [0], logs[0][-3000:]
    assert logs[0].count('are damaged') == 1 and 'recycling locally' in logs[0] and 'Recycling' in logs[0]
    assert downloads() == 2 and results[0]['digest'] != expected
    (recycled,) = (tmp_path / 'cache').rglob('*.safetensors')
    assert _digest(safetensors.torch.load_file(recycled)) == results[0]['digest']


# --- 4. bad inputs: a clear error naming the problem and the fix, nothing written ------------------------

@pytest.fixture(scope='module')
def bad_preds(tmp_path_factory, pred_dir):
    """Predecessor folders that cannot work: another family, missing / extra keys, one input channel."""
    root = tmp_path_factory.mktemp('bad_preds')
    save_for_hf(_randomize(timm.create_model('convnext_tiny', depths=(1, 1, 2, 1), dims=(16, 32, 48, 64),
                                             num_classes=10), 1), root / 'convnext', safe_serialization=True)
    save_for_hf(_randomize(timm.create_model('vit_small_patch16_224', in_chans=1, **PRED_KWARGS), 2), root / 'gray',
                safe_serialization=True)
    sd = safetensors.torch.load_file(pred_dir / 'model.safetensors')
    for name, weights in (('missing', {k: v for k, v in sd.items() if k != 'blocks.1.mlp.fc1.weight'}),
                          ('extra', dict(sd, **{'blocks.9.mlp.fc1.weight': torch.zeros(2)}))):
        (root / name).mkdir()
        (root / name / 'config.json').write_text((pred_dir / 'config.json').read_text())
        safetensors.torch.save_file(weights, root / name / 'model.safetensors')
    return root


def _calib_dirs(root: Path):
    (root / 'empty').mkdir(parents=True)
    (root / 'broken').mkdir()
    for i in range(3):
        (root / 'broken' / f'{i}.jpg').write_bytes(b'not an image')
    (root / 'a_file').write_text('not a folder')
    return root


_BAD_CONVERSIONS = [
    # (id, model, model kwargs, convert options (PRED:x = a predecessor folder), exception, message)
    ('convnext-for-vit', 'v_jetmoe_tiny', {}, dict(predecessor='PRED:convnext'), ValueError,
     'needs a dense timm VisionTransformer predecessor.*pass a ViT checkpoint'),
    ('vit-for-convnext', 'c_jetmoe_femto', dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), num_core_experts=4,
                                                num_univ_experts=6), {}, ValueError,
     'needs a dense timm ConvNeXt predecessor.*pass a ConvNeXt checkpoint'),
    ('wider-than-predecessor', 'v_jetmoe_tiny', dict(embed_dim=128, num_heads=4), {}, ValueError,
     'successor width 128 exceeds the predecessor width 64: pick a wider predecessor or a smaller embed_dim'),
    ('more-heads', 'v_jetmoe_tiny', dict(num_heads=8), {}, ValueError,
     'successor has 8 attention heads, the predecessor only 4: use num_heads <= 4'),
    ('missing-calib-folder', 'v_jetmoe_tiny', {}, dict(calib='CALIB:missing'), FileNotFoundError,
     "does not exist: pass an existing image folder, or calib='synthetic'"),
    ('calib-is-a-file', 'v_jetmoe_tiny', {}, dict(calib='CALIB:a_file'), ValueError,
     'is not a readable folder: pass a folder of images'),
    ('empty-calib-folder', 'v_jetmoe_tiny', {}, dict(calib='CALIB:empty'), ValueError,
     "holds no images.*add some, or use calib='synthetic'"),
    ('undecodable-calib', 'v_jetmoe_tiny', {}, dict(calib='CALIB:broken'), ValueError,
     "no image in .* could be decoded: check the files, or use calib='synthetic'"),
    ('unknown-method', 'v_jetmoe_tiny', {}, dict(method='best'), ValueError,
     "Unknown method 'best'; choose one of importance"),
    ('unknown-recipe', 'v_jetmoe_tiny', {}, dict(recipe='mine'), ValueError,
     "Unknown recipe 'mine'; choose one of paper, official"),
    ('unknown-statistic', 'v_jetmoe_tiny', {}, dict(statistic='max'), ValueError, "Unknown statistic 'max'"),
    ('graph-without-images', 'v_jetmoe_tiny', {}, dict(method='graph', calib='weights'), ValueError,
     "method 'graph' needs co-activation statistics: pass calibration images"),
    ('no-calibration-images', 'v_jetmoe_tiny', {}, dict(num_calib=0), ValueError, 'must be at least 1'),
    ('predecessor-missing-key', 'v_jetmoe_tiny', {}, dict(predecessor='PRED:missing'), RuntimeError,
     "do not fit the architecture its config.json names \\(Missing key.*blocks.1.mlp.fc1.weight.*\\): pass an "
     "unmodified timm checkpoint"),
    ('predecessor-extra-key', 'v_jetmoe_tiny', {}, dict(predecessor='PRED:extra'), RuntimeError,
     'do not fit the architecture its config.json names \\(Unexpected key.*blocks.9.mlp.fc1.weight'),
    ('predecessor-folder-missing', 'v_jetmoe_tiny', {}, dict(predecessor='PRED:nowhere'), FileNotFoundError,
     "predecessor folder .* does not exist: pass an existing folder with model.safetensors and config.json"),
    ('wrong-input-channels', 'v_jetmoe_tiny', {}, dict(predecessor='PRED:gray'), ValueError,
     'the predecessor takes 1 input channels, the successor 3: build the successor with in_chans=1'),
    ('image-smaller-than-patch', 'v_jetmoe_tiny', dict(img_size=2), {}, ValueError,
     r'cannot take any image: img_size \(2, 2\) is smaller than its patch_size \(4, 4\); use img_size >= patch_size'),
]


@pytest.mark.parametrize('case', _BAD_CONVERSIONS, ids=[c[0] for c in _BAD_CONVERSIONS])
def test_bad_conversions_fail_clearly_and_write_nothing(case, tmp_path, pred_dir, bad_preds):
    _, model, kwargs, options, exc, match = case
    if model == 'v_jetmoe_tiny':
        kwargs = dict(SUCC_KWARGS, **kwargs)
    calib = _calib_dirs(tmp_path / 'calib')
    options = {k: f'local-dir:{bad_preds / v[5:]}' if str(v).startswith('PRED:') else
               str(calib / v[6:]) if str(v).startswith('CALIB:') else v for k, v in options.items()}
    options.setdefault('predecessor', f'local-dir:{pred_dir}')
    options.setdefault('num_calib', 4)
    before = _files(tmp_path)
    with pytest.warns(UserWarning) if 'broken' in str(options.get('calib')) else contextlib.nullcontext():
        with pytest.raises(exc, match=match):
            convert(model, tmp_path / 'out', model_kwargs=kwargs, progress=False, **options)
    assert _files(tmp_path) == before  # no output folder, no temporary folder next to it


def test_undecodable_images_are_skipped_with_a_warning_and_counted(tmp_path, pred_dir, monkeypatch):
    """... and the folder is listed in full once per conversion: the checks on the way stop at its first image (an
    ImageNet-sized folder took ~30 s a listing, and was listed five times)."""
    from jetmoe_timm.recycle import calibration
    listed, real_walk = [], calibration._walk_images

    def counting_walk(folder):
        listed.append(0)
        for path in real_walk(folder):
            listed[-1] += 1
            yield path
    monkeypatch.setattr(calibration, '_walk_images', counting_walk)
    folder = tmp_path / 'calib'
    (folder / 'sub').mkdir(parents=True)
    for i in range(5):
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(folder / f'{i}.png')
    Image.fromarray((torch.rand(40, 40) * 255).byte().numpy()).save(folder / 'sub' / 'gray.png')  # converted to RGB
    (folder / 'zero.jpg').write_bytes(b'')
    (folder / 'text.png').write_bytes(b'not an image')
    truncated = (folder / '0.png').read_bytes()
    (folder / 'truncated.png').write_bytes(truncated[:len(truncated) // 2])
    (folder / 'notes.txt').write_text('not an image extension: ignored')
    with pytest.warns(UserWarning) as record:
        out = convert('v_jetmoe_tiny', tmp_path / 'out', model_kwargs=SUCC_KWARGS, predecessor=f'local-dir:{pred_dir}',
                      calib=str(folder), num_calib=100, progress=False)
    messages = [str(w.message) for w in record]
    assert sum('cannot be decoded' in m for m in messages) == 3
    assert '3 calibration image(s) could not be decoded and were skipped' in messages
    assert read_provenance(out / 'model.safetensors')['calibration_images'] == 6  # the decodable ones, counted
    assert len(listed) >= 3 and [n for n in listed if n > 1] == [9]  # 9 image files in all


def test_bad_loads_fail_clearly_and_write_nothing(tmp_path, pred_dir, bad_preds, monkeypatch):
    cache = tmp_path / 'cache'
    monkeypatch.setenv('JETMOE_TIMM_CACHE', str(cache))
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{pred_dir}')

    def create(**kw):
        return timm.create_model('v_jetmoe_tiny', pretrained=True, **dict(SUCC_KWARGS, **kw))

    # requests that are wrong before any model is loaded: not even the cache folder is created
    monkeypatch.setenv('JETMOE_TIMM_CALIB', str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        create()
    monkeypatch.setenv('JETMOE_TIMM_CALIB', 'synthetic')
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', 'many')
    with pytest.raises(ValueError, match="JETMOE_TIMM_CALIB_IMAGES='many' is not a positive number"):
        create()
    monkeypatch.setenv('JETMOE_TIMM_CALIB_IMAGES', '4')
    monkeypatch.delenv('JETMOE_TIMM_PREDECESSOR')  # the default architecture and predecessor: the Hub file is wanted
    with pytest.raises(ValueError, match="hf_hub_id 'org/bad name' is not a valid Hub repo id.*use 'ORG/NAME'"):
        # (the 265 M-parameter model is never built: the check comes first)
        timm.create_model('v_jetmoe_tiny', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='org/bad name'))
    assert not cache.exists()

    # a predecessor that does not fit: found under the build lock; no weights, no temporary file
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{bad_preds / "convnext"}')
    with pytest.raises(ValueError, match='VisionTransformer predecessor'):
        create()
    assert [p.name for p in (cache / TAG).iterdir()] == [p.name for p in (cache / TAG).glob('*.safetensors.lock')]

    # a user's weights file with a missing tensor: timm's strict load names it
    monkeypatch.setenv('JETMOE_TIMM_PREDECESSOR', f'local-dir:{pred_dir}')
    sd = timm.create_model('v_jetmoe_tiny', **SUCC_KWARGS).state_dict()
    del sd['blocks.3.mlp.slot_query']
    safetensors.torch.save_file(sd, tmp_path / 'mine.safetensors')
    with pytest.raises(RuntimeError, match='Missing key.*blocks.3.mlp.slot_query'):
        create(pretrained_cfg_overlay=dict(file=str(tmp_path / 'mine.safetensors')))

    # one input channel: the recycled 3-channel weights are adapted by timm (summed over RGB)
    gray = create(in_chans=1)
    rgb = create()
    assert gray.patch_embed.proj.weight.shape[1] == 1
    torch.testing.assert_close(gray.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.isfinite(rgb.eval()(torch.randn(1, 3, 32, 32))).all()


def test_invalid_repo_ids_are_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    folder = save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), tmp_path / 'f')
    shape = "--repo-id must look like ORG/NAME, got '{}'"
    valid = "--repo-id '{}' is not a valid Hub repo id"
    for repo_id, says in [('noslash', shape), ('a/b/c', shape), ('org/', shape), ('/name', shape),
                          ('org/bad name', valid), ('-org/name', valid), ('org/na..me', valid),
                          ('org/' + 'x' * 97, valid)]:
        with pytest.raises(ValueError, match=re.escape(says.format(repo_id))):
            push_to_hub(folder, repo_id, dry_run=True)
        assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']  # no model card


def test_overwrite_replaces_only_an_earlier_model_folder(tmp_path, monkeypatch):
    """--overwrite must never delete what the user keeps in a folder, nor the folder the user is in."""
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS)
    precious = tmp_path / 'precious'
    (precious / 'sub').mkdir(parents=True)
    (precious / 'notes.txt').write_text('keep')
    with pytest.raises(FileExistsError, match=r'holds files that are not a converted model \(notes.txt, sub\)'):
        save_pretrained_folder(model, precious, overwrite=True)
    assert sorted(p.name for p in precious.iterdir()) == ['notes.txt', 'sub']
    # a user's folder whose file names look like a model folder's, and a model folder with a hand-written card
    lookalike = tmp_path / 'lookalike'
    lookalike.mkdir()
    (lookalike / 'README.md').write_text('my notes')
    (lookalike / 'config.json').write_text('{"lr": 0.1}')
    handmade = save_pretrained_folder(model, tmp_path / 'handmade')
    (handmade / 'README.md').write_text('my own model card')
    # a dense timm model folder (save_for_hf: the same two file names), e.g. the predecessor being converted
    dense = tmp_path / 'dense'
    timm.models.save_for_hf(timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1), dense,
                            safe_serialization=True)
    for folder in (lookalike, handmade, dense):
        with pytest.raises(FileExistsError, match='holds files that are not a converted model'):
            save_pretrained_folder(model, folder, overwrite=True)
    assert (lookalike / 'README.md').read_text() == 'my notes' and (handmade / 'README.md').is_file()
    assert sorted(p.name for p in dense.iterdir()) == ['config.json', 'model.safetensors']
    shutil.rmtree(lookalike), shutil.rmtree(handmade), shutil.rmtree(dense)
    (tmp_path / 'made_first').mkdir()  # an empty folder made beforehand (mkdir -p) is filled, without --overwrite
    made = save_pretrained_folder(model, tmp_path / 'made_first')
    assert sorted(p.name for p in made.iterdir()) == ['config.json', 'model.safetensors']
    with pytest.raises(FileExistsError, match='already exists: choose another --out or pass overwrite=True'):
        save_pretrained_folder(model, made)  # ... which then holds files
    # a damaged earlier output (truncated weights) is still one: --overwrite replaces it
    with open(made / 'model.safetensors', 'r+b') as f:
        f.truncate(5000)
    save_pretrained_folder(model, made, overwrite=True)
    verify_safetensors(made / 'model.safetensors')
    shutil.rmtree(made)
    (tmp_path / 'real').mkdir()  # a link to an empty folder: refused, not replaced by the rename
    (tmp_path / 'link').symlink_to(tmp_path / 'real')
    with pytest.raises(FileExistsError, match='already exists'):
        save_pretrained_folder(model, tmp_path / 'link')
    (tmp_path / 'link').unlink(), (tmp_path / 'real').rmdir()

    folder = save_pretrained_folder(model, tmp_path / 'f')
    monkeypatch.chdir(folder)
    for here in ('.', str(folder)):  # the current folder, by any name
        with pytest.raises(FileExistsError, match='is the current folder or holds it'):
            save_pretrained_folder(model, here, overwrite=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match='is the current folder or holds it'):
        save_pretrained_folder(model, '.', overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']

    # an earlier output is replaced; when the new folder cannot be moved in, the old one is put back
    before = (folder / 'model.safetensors').read_bytes()
    real_replace = os.replace

    def moving_in_fails(src, dst):  # the finished folder (beside 'f'; the old one is moved into a '.old' folder)
        if Path(dst) == folder and Path(src).parent == tmp_path:
            raise OSError('rename failed')
        return real_replace(src, dst)

    def moving_aside_fails(src, dst):  # e.g. EBUSY: the folder is a mount point or in use
        if Path(src) == folder:
            raise OSError('device or resource busy')
        return real_replace(src, dst)

    def interrupted_as_moved_aside(src, dst):  # Ctrl-C just as the old folder's move returns
        real_replace(src, dst)
        if Path(src) == folder:
            raise KeyboardInterrupt

    for failing, error, says in ((moving_in_fails, OSError, 'rename failed'),
                                 (moving_aside_fails, OSError, 'resource busy'),
                                 (interrupted_as_moved_aside, KeyboardInterrupt, None)):
        monkeypatch.setattr(os, 'replace', failing)
        with pytest.raises(error, match=says):
            save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), 'f',
                                   overwrite=True)
        monkeypatch.setattr(os, 'replace', real_replace)
        assert (folder / 'model.safetensors').read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ['f', 'precious']  # nothing half-written

    def user_adds_a_file_meanwhile(src, dst):  # between the early check and the replacement
        if Path(src) == folder:
            (folder / 'added.txt').write_text('mine')
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', user_adds_a_file_meanwhile)
    with pytest.raises(FileExistsError, match='changed while it was being replaced'):
        save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), 'f', overwrite=True)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert (folder / 'added.txt').read_text() == 'mine' and (folder / 'model.safetensors').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f', 'precious']
    (folder / 'added.txt').unlink()
    torch.manual_seed(1)
    save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), 'f', overwrite=True)
    assert (folder / 'model.safetensors').read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f', 'precious']



def test_two_writers_of_one_new_folder_never_replace_each_other(tmp_path, monkeypatch):
    """Two conversions into one new --out at once, without --overwrite (data export shares the code): both pass
    the early check; the first to finish writes the folder, the other is refused in one line and leaves nothing.
    Both said they wrote it, the second having replaced the first's."""
    from jetmoe_timm import export
    barrier = threading.Barrier(2, timeout=120)
    real_save = export.save_safetensors_atomic

    def both_past_the_check(*args, **kwargs):
        barrier.wait()
        return real_save(*args, **kwargs)

    monkeypatch.setattr(export, 'save_safetensors_atomic', both_past_the_check)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS))
    out, said = tmp_path / 'f', [None, None]

    def write(i):
        try:
            save_pretrained_folder(models[i], out)
            said[i] = 'wrote'
        except FileExistsError as e:
            said[i] = str(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(said, key=lambda s: s != 'wrote')[0] == 'wrote', said
    winner = said.index('wrote')
    assert said[1 - winner] == f'{out} was written by another process while this one ran: it is kept, and this ' \
                               f'output discarded; write to another folder.'
    kept = safetensors.torch.load_file(out / 'model.safetensors')
    assert all(torch.equal(kept[k], v) for k, v in models[winner].state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ['f']  # the refused output removed


def test_a_killed_writers_folder_is_removed_by_the_next_write(tmp_path):
    """A convert killed by SIGKILL leaves its hidden temporary folder beside --out (gigabytes for a full-size model);
    the next write of that output deletes it, never a live writer's (this process's), another output's, or one of
    another kind (a data export's)."""
    from jetmoe_timm.atomic import writing_folder
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    host = socket.gethostname()
    # its temporary folder, and the earlier output an --overwrite had moved aside until the new one was in place
    killed = [tmp_path / f'.f.{host}-{gone.pid}.abcd_123', tmp_path / f'.f.{host}-{gone.pid}.wxyz_789.old']
    kept = [tmp_path / f'.f.{host}-{os.getpid()}.zzzz9999', tmp_path / f'.g.{host}-{gone.pid}.abcd_123',
            tmp_path / f'.f.{host}-{gone.pid}.abcd_123.tmp', tmp_path / f'.f.otherhost-{gone.pid}.abcd_123',
            tmp_path / f'.f.{host}-{os.getpid()}.zzzz9999.old']
    for folder in (*killed, *kept):
        folder.mkdir()
        (folder / 'model.safetensors').write_bytes(b'x' * 100)
    torch.manual_seed(0)
    umask = os.umask(0o027)  # the written folder takes the user's umask, as one made by mkdir
    try:
        save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), tmp_path / 'f')
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / 'f').stat().st_mode) == 0o750
    assert not any(folder.exists() for folder in killed) and all(folder.exists() for folder in kept)
    assert writing_folder(tmp_path / 'f').name.startswith(f'.f.{host}-{os.getpid()}.')


def test_a_killed_weights_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    """safetensors writes a temporary file of its own beside the one it is given: killed in save_file, a cache
    build left up to the model's size behind for good. The weights are written in a writer's folder, which the
    next write of that file removes with whatever the killed writer left in it."""
    from jetmoe_timm.atomic import _umask
    from jetmoe_timm.export import save_safetensors_atomic
    gone = subprocess.Popen([sys.executable, '-c', 'pass'])
    gone.wait()
    killed = tmp_path / f'.w.safetensors.{socket.gethostname()}-{gone.pid}.abcd_123'
    killed.mkdir()
    (killed / '.tmpAbC123').write_bytes(b'x' * 1000)  # safetensors' own temporary file, as it names them
    save_safetensors_atomic({'a': torch.zeros(3)}, tmp_path / 'w.safetensors', dict(method='importance'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['w.safetensors']
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~_umask()


def test_written_folders_keep_a_setgid_parents_group_bit(tmp_path):
    """In a setgid (group-shared) folder an output folder keeps the bit, as one made by mkdir does, so that what is
    written inside it takes the shared group too; its other permissions follow the umask."""
    from jetmoe_timm.atomic import _umask, writing_folder
    shared = tmp_path / 'shared'
    shared.mkdir()
    os.chmod(shared, 0o2775)
    assert _umask() == os.umask(_umask())  # read from /proc: the same as the portable read
    folder = writing_folder(shared / 'out')
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2777 & ~_umask()


def test_push_without_token_sends_nothing(tmp_path, local_hub, monkeypatch):
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.delenv('HUGGING_FACE_HUB_TOKEN', raising=False)
    torch.manual_seed(0)
    folder = save_pretrained_folder(timm.create_model('v_jetmoe_tiny', num_classes=10, **SUCC_KWARGS), tmp_path / 'f')
    sent = len(local_hub.requests)
    with pytest.raises(RuntimeError, match='No Hugging Face token: run `hf auth login` or set HF_TOKEN'):
        push_to_hub(folder, 'org/name', endpoint=local_hub.url)
    assert len(local_hub.requests) == sent  # nothing reached the Hub
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']  # nor the folder


# --- 5. numerics of the SpheroMoE layer ------------------------------------------------------------------

def _layer(combine='softmax', **kwargs):
    torch.manual_seed(0)
    layer = SpheroMoE(**dict(dict(dim=16, num_core_experts=3, num_univ_experts=5, slots_per_expert=2,
                                  combine=combine), **kwargs)).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith('bias'):
                p.normal_(std=0.1)
    layer.capture_routing = True
    return layer


def _inputs(fp16: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, generator=g)
    big = 1e4 if fp16 else 1e15  # fp16 holds up to 65504; bf16 / fp32 far more
    return {
        'normal': x,
        'large': x / x.abs().max() * big,
        'tiny': x * 1e-12,
        'zeros': torch.zeros(2, 9, 16),
        'all-equal-tokens': x[:, :1].expand(2, 9, 16).contiguous(),
        'batch-of-one': x[:1],
        'single-token': x[:1, :1],
        'single-token-per-image': x[:, :1],
        'mixed-scales': x * torch.logspace(-6, 4, 9)[None, :, None],
    }


def _check_routing(layer, out, x, where):
    r = layer.last_routing
    B, N = x.shape[:2]
    assert torch.isfinite(out).all(), where
    assert torch.isfinite(r['dispatch']).all() and torch.isfinite(r['combine']).all(), where
    assert (r['dispatch'] >= 0).all() and (r['combine'] >= 0).all(), where
    torch.testing.assert_close(r['dispatch'].sum(1), torch.ones(B, layer.num_slots), msg=where)  # over tokens
    torch.testing.assert_close(r['combine'].sum(-1), torch.ones(B, N), msg=where)  # over slots


@pytest.mark.parametrize('combine', ['softmax', 'entmax15'])
@pytest.mark.parametrize('dtype', [None, torch.bfloat16, torch.float16], ids=['fp32', 'bf16', 'fp16'])
def test_extreme_inputs_stay_finite_and_routing_sums_to_one(dtype, combine):
    layer = _layer(combine)
    for name, x in _inputs(dtype == torch.float16).items():
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = layer(x)
        assert out.shape == x.shape
        _check_routing(layer, out, x, f'{name} ({dtype}, {combine})')


def test_all_equal_tokens_give_the_same_output_for_every_token():
    layer = _layer()
    x = torch.randn(1, 1, 16).expand(2, 7, 16)
    out = layer(x)
    torch.testing.assert_close(out, out[:, :1].expand_as(out))
    torch.testing.assert_close(layer.last_routing['dispatch'], torch.full((2, 7, layer.num_slots), 1 / 7))


def test_routing_is_scale_invariant_over_a_wide_range():
    """Cosine routing: the same logits for x and c * x, from tiny to very large activations."""
    layer = _layer()
    x = torch.randn(2, 9, 16)
    base = layer.routing_logits(x)
    for c in (1e-3, 1e3, 1e10, 1e15):
        torch.testing.assert_close(layer.routing_logits(x * c), base, atol=1e-3, rtol=0)


def test_temperatures_stay_positive_and_finite():
    layer = _layer()
    for raw in (-1e4, -1e30, float('-inf'), 0., 1e4):
        with torch.no_grad():
            layer.temp_raw.fill_(raw)
        t = layer.temperature
        assert (t >= layer.temperature_min).all() and torch.isfinite(t).all(), raw
        x = torch.randn(2, 9, 16)
        _check_routing(layer, layer(x), x, f'temp_raw={raw}')
    # an optimiser driving the temperature down as hard as it can
    layer = _layer()
    opt = torch.optim.SGD([layer.temp_raw], lr=1e6)
    for _ in range(5):
        opt.zero_grad()
        layer.temperature.sum().backward()
        opt.step()
    assert (layer.temperature >= layer.temperature_min).all() and torch.isfinite(layer.temp_raw).all()
    # in half precision too
    for dtype in (torch.bfloat16, torch.float16):
        half = _layer().to(dtype)
        with torch.no_grad():
            half.temp_raw.fill_(-1e4)
        assert (half.temperature > 0).all()
        x = torch.randn(2, 9, 16, dtype=dtype)
        out = half(x)
        assert out.dtype == dtype
        _check_routing(half, out, x, str(dtype))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_tiny_model_under_autocast_with_extreme_images(dtype, tiny_vit_kwargs):
    torch.manual_seed(0)
    model = timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs).eval()
    for x in (torch.randn(2, 3, 32, 32) * 100, torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 7.)):
        with torch.autocast('cpu', dtype=dtype):
            assert torch.isfinite(model(x)).all()


def test_pretrained_path_with_num_classes_minus_one_gets_timm_fresh_head(tmp_path, tiny_vit_kwargs):
    """train.py's --pretrained-path: pretrained_cfg_overlay=dict(file=FILE, num_classes=-1) forces a new head even
    when FILE's fits; the body comes from FILE and the head is exactly timm's fresh init, as for a dense ViT."""
    torch.manual_seed(0)
    src = timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs)
    weights = save_safetensors_atomic(src.state_dict(), tmp_path / 'ft.safetensors')
    torch.manual_seed(1)
    model = timm.create_model('v_jetmoe_tiny', pretrained=True, num_classes=10, **tiny_vit_kwargs,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=-1))
    torch.manual_seed(1)
    fresh = timm.create_model('v_jetmoe_tiny', num_classes=10, **tiny_vit_kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, (fresh if k.startswith('head.') else src).state_dict()[k]), k
    # without the signal the file's head is kept (and memory-mapped)
    model = timm.create_model('v_jetmoe_tiny', pretrained=True, num_classes=10, **tiny_vit_kwargs,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=10))
    assert torch.equal(model.head.weight, src.head.weight)
