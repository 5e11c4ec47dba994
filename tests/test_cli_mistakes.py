"""Every mistake a user makes on the command line gets one line that names it and the fix, exit code 2, no
traceback, and leaves nothing behind: the real ``jetmoe-timm`` CLI, one process per mistake."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models import save_for_hf

from jetmoe_timm.export import save_pretrained_folder

SUCC = ['img_size=32', 'patch_size=4', 'embed_dim=32', 'depth=4', 'num_heads=2', 'num_core_experts=2',
        'num_univ_experts=2']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Files a user might point the CLI at: good ones and broken ones."""
    d = tmp_path_factory.mktemp('mistakes')
    torch.manual_seed(0)
    pred = timm.create_model('vit_small_patch16_224', img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=1)
    save_for_hf(pred, d / 'pred', safe_serialization=True)
    good = (d / 'pred' / 'model.safetensors').read_bytes()
    (d / 'truncated.safetensors').write_bytes(good[:len(good) // 3])
    for name, weights, config in (('pred_cut', good[:len(good) // 3], None), ('pred_badcfg', good, '{not json')):
        (d / name).mkdir()  # a predecessor folder whose copy stopped short, or whose config.json was hand-edited
        (d / name / 'model.safetensors').write_bytes(weights)
        (d / name / 'config.json').write_text(config or (d / 'pred' / 'config.json').read_text())
    (d / 'typo_card.md').write_text('# ${display_name}\n\nLoad ${modle_name}.\n')
    (d / 'dollar_card.md').write_text('# ${display_name}\n\nCosts $ 5.\n')
    (d / 'card.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(16))  # a picture given for the card
    (d / 'garbage.safetensors').write_bytes(os.urandom(4096))
    (d / 'garbage.pth').write_bytes(b'not a pickle at all')
    save_file({'encoder.weight': torch.zeros(2, 2)}, d / 'foreign.safetensors')
    cnx = timm.create_model('convnext_tiny', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    save_file({k: v.contiguous() for k, v in cnx.state_dict().items()}, d / 'convnext.safetensors')
    (d / 'a_file').write_text('x')
    Image.new('RGB', (32, 32), (90, 120, 200)).save(d / 'image.png')
    (d / 'dangling').symlink_to(d / 'gone')
    (d / 'exists').mkdir()
    (d / 'exists' / 'keep.txt').write_text('keep')
    (d / 'empty_calib').mkdir()
    succ = timm.create_model('v_jetmoe_tiny', **{k: int(v) for k, v in (a.split('=') for a in SUCC)})
    save_pretrained_folder(succ, d / 'converted', dict(method='importance'))
    return d


def _rows(d):
    """(command line, what the one line must say)."""
    pred = f'local-dir:{d / "pred"}'
    conv = ['convert', 'v_jetmoe_tiny', '--no-progress', '--num-calib', '4']
    new = str(d / 'new')
    return [
        (['convert', 'v_jetmoe_huge', '--out', new], "Unknown model 'v_jetmoe_huge'"),
        (['convert', 'v_jetmoe_tny', '--out', new], "Unknown model 'v_jetmoe_tny' (did you mean 'v_jetmoe_tiny'?)"),
        (['convert', 'v_jetmoe_tiny.recycled_in21', '--out', new],
         "'v_jetmoe_tiny' has no pretrained tag 'recycled_in21' (did you mean 'recycled_in21k'?)"),
        (['push', 'v_jetmoe_tiny.official_in1k', '--repo-id', 'me/x', '--dry-run', '--out', new],
         "holds the official MoE Jetpack weights, which are converted, not recycled: jetmoe-timm convert v_jetmoe_tiny "
         "--from-official FILE"),
        (['convert', 'v_jetmoe_tiny', '--ouy', new], "required: --out; did you mean '--out' for '--ouy'?"),
        (conv + ['--out', new, '--model-kwargs', 'embed_dm=96'], "did you mean 'embed_dim'"),
        (conv + ['--out', new, '--model-kwargs', 'embed_dim=x'], '--model-kwargs embed_dim=x: v_jetmoe_tiny takes a '
                                                                 'whole number for embed_dim.'),
        (conv + ['--out', new, '--model-kwargs', 'num_core_experts=2.5'], 'takes a whole number for num_core_experts'),
        (conv + ['--out', new, '--model-kwargs', 'univ_ratio=x'], 'takes a number for univ_ratio'),
        (conv + ['--out', new, '--model-kwargs', 'img_size=(32,32)', 'depth=x'], 'takes a whole number for depth'),
        (conv + ['--out', new, '--model-kwargs', 'global_pool=', 'v_jetmoe_tiny'],
         "model kwarg 'v_jetmoe_tiny' is not of the form key=value"),
        (['convert', 'c_jetmoe_femto', '--out', new, '--model-kwargs', 'ls_init_value=None'],
         "--model-kwargs ls_init_value=None: timm's create_model drops arguments set to None"),
        (conv + ['--out', new, '--model-kwargs', 'moe_blocks=[2,', '3]'], "model kwarg 'moe_blocks=[2, 3]' has a space, "
                                                                          'which the shell splits: write it without '
                                                                          'spaces (moe_blocks=[2,3]) or quote it'),
        (conv + ['--out', new, '--model-kwargs', 'embed_dim'], 'not of the form key=value'),
        (['convert', '--model-kwargs', 'embed_dim=32', 'v_jetmoe_tiny', '--out', new],
         "required: model; --model-kwargs took 'v_jetmoe_tiny', which is no K=V: put --model-kwargs after the "
         "positional arguments"),
        (conv + ['--out', new, '--model-kwargs', 'embed_dim=100'], 'do not make a v_jetmoe_tiny'),
        (conv + ['--out', str(d / 'a_file'), '--overwrite'], 'is a file: give a folder path'),
        (conv + ['--out', str(d / 'a_file' / 'out')], 'is a file, not a folder'),
        (conv + ['--out', '/sys/jetmoe_out'], '/sys is not writable'),  # even for root, before any work
        (conv + ['--out', str(d / 'dangling')], 'is a link to nothing'),
        (conv + ['--out', str(d / 'exists')], 'already exists'),
        (conv + ['--out', str(d / 'exists'), '--overwrite'], 'holds files that are not a converted model (keep.txt)'),
        (conv + ['--out', new, '--predecessor', f'local-dir:{d / "nowhere"}'], 'does not exist'),
        (conv + ['--out', new, '--predecessor', str(d / 'nowhere.safetensors')],
         "predecessor file '" + str(d / 'nowhere.safetensors') + "' does not exist"),
        (conv + ['--out', new, '--predecessor', 'nowhere.pth'], "predecessor file 'nowhere.pth' does not exist"),
        (conv + ['--out', new, '--predecessor', 'vit_smal_patch16_224'],
         "Unknown predecessor 'vit_smal_patch16_224' (did you mean 'vit_small_patch16_224'?)"),
        (conv + ['--out', new, '--predecessor', 'vit_small_patch16_224.bogus'],
         "'vit_small_patch16_224' has no pretrained tag 'bogus': pick one of ['augreg_in21k_ft_in1k',"),
        (conv + ['--out', new, '--predecessor', str(d / 'truncated.safetensors'), '--model-kwargs', *SUCC],
         'cannot be read as a checkpoint'),
        (conv + ['--out', new, '--predecessor', str(d / 'garbage.safetensors'), '--model-kwargs', *SUCC],
         'cannot be read as a checkpoint'),
        (conv + ['--out', new, '--predecessor', str(d / 'garbage.pth'), '--model-kwargs', *SUCC],
         'cannot be read as a checkpoint'),
        (conv + ['--out', new, '--predecessor', str(d / 'foreign.safetensors'), '--model-kwargs', *SUCC],
         'not a timm-format VisionTransformer checkpoint'),
        (conv + ['--out', new, '--predecessor', str(d / 'convnext.safetensors'), '--model-kwargs', *SUCC],
         'not a timm-format VisionTransformer checkpoint'),
        (conv + ['--out', new, '--predecessor', 'hf-hub:nobody/nothing', '--model-kwargs', *SUCC],
         "Cannot load the predecessor 'hf-hub:nobody/nothing'"),
        (conv + ['--out', new, '--predecessor', pred, '--recipe', 'official', '--model-kwargs', *SUCC],  # its own flag
         "Cannot load the body predecessor 'vit_tiny_patch16_224.augreg_in21k' of recipe 'official' (HF_HUB_OFFLINE "
         "is set and it is not in the local cache). Ways out: connect to the Hugging Face Hub once (it is cached "
         "afterwards); or pass body_predecessor (jetmoe-timm convert: --body-predecessor)"),
        (conv + ['--out', new, '--predecessor', pred, '--calib', str(d / 'no_calib')], 'does not exist'),
        (conv + ['--out', new, '--predecessor', pred, '--calib', str(d / 'empty_calib')], 'holds no images'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--num-calib', '0'], 'must be at least 1'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--calib', 'weights', '--calib-size', 'predecessor'],
         "calib_size 'predecessor' (--calib-size) sizes calibration images, and calib='weights' takes none"),
        (['convert', 'c_jetmoe_femto', '--out', new, '--recipe', 'official'], 'exists for ViT only'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--method', 'graph', '--calib', 'weights'],
         'needs co-activation statistics'),
        (conv + ['--out', new, '--predecessor', pred, '--model-kwargs', *SUCC[:2], 'embed_dim=128', 'num_heads=2',
                 *SUCC[4:]], 'exceeds the predecessor width'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--from-official', str(d / 'garbage.pth')],
         'is no PyTorch checkpoint (neither a zip archive nor a pickle)'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--from-official', str(d / 'garbage.safetensors')],
         'cannot be read as safetensors'),
        (['convert', 'v_jetmoe_tiny', '--out', new, '--from-official', str(d / 'exists')],
         'is a folder: pass the official checkpoint file itself'),
        # options that would be silently unused
        (['convert', 'v_jetmoe_tiny', '--out', new, '--from-official', str(d / 'garbage.pth'), '--method', 'copy',
          '--calib', 'weights'], '--method, --calib: recycling options do not apply to --from-official'),
        (['convert', 'c_jetmoe_femto', '--out', new, '--from-official', str(d / 'garbage.pth')],
         "official MoE Jetpack checkpoints are V-JetMoE (ViT) models, and 'c_jetmoe_femto' is not one"),
        (conv + ['--out', new, '--predecessor', pred, '--body-predecessor', pred, '--model-kwargs', *SUCC],
         "body_predecessor (--body-predecessor) applies to recipe 'official' only"),
        # a damaged predecessor folder: the file and the fix, not a parser's message
        (conv + ['--out', new, '--predecessor', f'local-dir:{d / "pred_cut"}', '--model-kwargs', *SUCC],
         f"predecessor folder 'local-dir:{d / 'pred_cut'}': {d / 'pred_cut' / 'model.safetensors'} is "),
        (conv + ['--out', new, '--predecessor', f'local-dir:{d / "truncated.safetensors"}'],
         "is a file, and 'local-dir:' names a folder: pass the file without 'local-dir:'"),
        (conv + ['--out', new, '--predecessor', f'local-dir:{d / "pred_badcfg"}', '--model-kwargs', *SUCC],
         "config.json is not valid JSON (Expecting property name enclosed in double quotes"),
        # a card template's mistakes: said before the conversion (new/ must not appear)
        (['push', 'v_jetmoe_tiny', '--repo-id', 'me/x', '--dry-run', '--out', new, '--card-template',
          str(d / 'typo_card.md')], "line 3: unknown placeholder 'modle_name' (did you mean 'model_name'?)"),
        (['push', 'v_jetmoe_tiny', '--repo-id', 'me/x', '--dry-run', '--out', new, '--card-template',
          str(d / 'card.png')], 'card.png is not UTF-8 text: pass a Markdown file to --card-template'),
        (['push', 'v_jetmoe_tiny', '--repo-id', 'me/x', '--dry-run', '--out', new, '--card-template',
          str(d / 'dollar_card.md')], "line 3: a '$' that starts no placeholder"),
        (['data', 'export', 'mnist5k', new, '--limit', 'test=5'], "limit names splits ['test']"),
        (['data', 'export', 'mnist5k', str(d / 'a_file')], 'is a file: give a folder path'),
        (['data', 'export', 'mnist5k', new, '--limit', '5'], 'smaller than the 10 classes'),
        (['data', 'export', 'mnist5k', str(d / 'exists')], 'already exists'),
        (['data', 'export', 'mnist5k', str(d / 'exists'), '--force'], 'holds files that are not an exported dataset'),
        (['data', 'export', 'mnist5k', str(d / 'converted'), '--force'], 'are not an exported dataset'),
        (['inspect', 'v_jetmoe_tiny', str(d / 'no_image.png'), '--out', new, '--top-k', '0'], '--top-k must be >= 1'),
        (['inspect', 'v_jetmoe_tiny', str(d / 'no_image.png'), '--out', new, '--model-kwargs', 'num_head=2'],
         "did you mean 'num_heads'"),
        (['inspect', 'v_jetmoe_tiny', str(d / 'no_image.png'), '--out', str(d / 'a_file')], 'is a file'),
        (['inspect', 'v_jetmoe_tiny', str(d / 'image.png'), '--out', new, '--device', 'cuda:99'],
         'torch sees no CUDA GPU here' if not torch.cuda.is_available() else 'numbered from 0'),
        (['push', '--from', str(d / 'nowhere'), '--repo-id', 'me/x', '--dry-run'], 'nowhere'),
        (['push', '--from', str(d / 'converted'), '--repo-id', 'me/x', '--dry-run', '--method', 'copy'],
         'do not apply to --from'),
        (['push', '--dry-run'], 'give MODEL to convert'),
        # a branch name git refuses: said before the conversion (new/ must not appear) or the card is written
        (['push', 'v_jetmoe_tiny', '--repo-id', 'me/x', '--revision', 'my branch', '--dry-run', '--out', new],
         "--revision 'my branch' is not a valid branch name"),
        (['push', '--from', str(d / 'converted'), '--repo-id', 'me/x', '--revision', 'v1..2', '--dry-run'],
         'is not a valid branch name'),
        (['push', '--from', str(d / 'converted'), '--repo-id', 'me/x', '--revision', 'HEAD', '--dry-run'],
         "--revision 'HEAD' is not a valid branch name"),
        (['data', 'export', 'mnist5k', new, '--calib-images', '10'], 'add a limit (--limit train=N)'),
        (['data', 'export', 'mnist5k', new, '--limit', 'train=10', 'train=20'], 'names train twice'),
        (['demo', '--out', str(d / 'a_file')], 'is a file: give a folder path'),
        (['demo', '--out', str(d / 'a_file' / 'sub')], 'is a file, not a folder'),
        # bench: every count checked before its --out folder is made (new/ must not appear)
        (['bench', '--quick', '--out', f'{new}/b.json', '--batch-sizes', '0'], 'batch sizes must be at least 1'),
        (['bench', '--quick', '--out', f'{new}/b.json', '--rounds', '0'], '--rounds 0: give at least 1'),
        (['bench', '--quick', '--out', f'{new}/b.json', '--threads', '0'], '--threads 0: give at least 1'),
        (['bench', '--quick', '--out', f'{new}/b.json', '--threads', '999'], '--threads 999: this process may run on'),
        (['convert', 'v_jetmoe_tiny', '--out', ''], '--out is empty: give a folder path'),
        (['bench', '--quick', '--out', f'{new}/b.json', '--precisions', 'bf16-weights', '--modes', 'train'],
         "['bf16-weights'] time inference only"),
        (['bench', '--quick', '--out', f'{new}/b.json', '--device', 'cuda:99'], 'torch sees no CUDA GPU' if
         not torch.cuda.is_available() else 'numbered from 0'),
        (['bench', '--quick', '--out', f'{new}/b.json', '--compile', 'all', '--compile-batch-sizes', '64'],
         'are not among the batch sizes [32]'),
        # argparse's own errors: one line too (no usage block), a misspelled option named with the closest one
        (conv + ['--out', new, '--batch-size', 'abc'], "argument --batch-size: invalid int value: 'abc'"),
        (conv + ['--out', new, '--methdo', 'graph'], "unrecognized arguments: --methdo graph; did you mean '--method'?"),
        (['inspect', 'v_jetmoe_tiny', str(d / 'a_file'), '--topk', '2'], "did you mean '--top-k'?"),
        # predecessor and successor mixed up: each named for what it is, with the way from one to the other
        (conv + ['--out', new, '--predecessor', str(d / 'converted' / 'model.safetensors')],
         'holds a JetMoE model (SpheroMoE layers), not a dense predecessor'),
        (['push', '--from', str(d / 'pred'), '--repo-id', 'me/x', '--dry-run'],
         "holds a dense 'vit_small_patch16_224', not a JetMoE model: convert it first"),
        (['inspect', 'v_jetmoe_tiny', str(d / 'image.png'), '--out', new, '--checkpoint',
          str(d / 'pred' / 'model.safetensors'), '--model-kwargs', *SUCC], 'It is a dense checkpoint: recycle it'),
        (['convert', 'vit_small_patch16_224', '--out', new],
         'is a dense model: make a JetMoE model (v_jetmoe_small, v_jetmoe_tiny)'),
        (['data', 'export', 'mnist', new], "argument dataset: invalid choice: 'mnist'"),
    ]


def _run(argv, env):
    return subprocess.run([sys.executable, '-m', 'jetmoe_timm.tools.cli', *argv], env=env, capture_output=True,
                          text=True, timeout=300)


# Each mistake in a fresh process forked from one that imported the CLI once: a process per mistake as the real
# command gives, without paying ``import timm`` (~4 s here) 60 times. No torch op runs before the forks.
_FORK_SERVER = r'''
import json, os, sys, traceback
from jetmoe_timm.tools import cli
cli.build_parser()  # imports every subcommand's module
rows, parallel = json.loads(sys.stdin.readline())
codes, running = [None] * len(rows), {}

def reap():
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

for i, (argv, out, err) in enumerate(rows):
    if len(running) >= parallel:
        reap()
    pid = os.fork()
    if pid == 0:
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = cli.main(argv)
        except SystemExit as e:  # as the interpreter maps it
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    running[pid] = i
while running:
    reap()
print(json.dumps(codes))
'''


def _run_forked(argvs, env, tmp_path, parallel=4):
    """``subprocess.CompletedProcess`` of each command line, each run by ``cli.main`` in a forked process."""
    rows = [(argv, str(tmp_path / f'{i}.out'), str(tmp_path / f'{i}.err')) for i, argv in enumerate(argvs)]
    server = subprocess.run([sys.executable, '-c', _FORK_SERVER], input=json.dumps([rows, parallel]), env=env,
                            capture_output=True, text=True, timeout=600)
    assert server.returncode == 0, server.stderr[-3000:]
    codes = json.loads(server.stdout)
    return [subprocess.CompletedProcess(argv, code, Path(out).read_text(), Path(err).read_text())
            for (argv, out, err), code in zip(rows, codes)]


@pytest.mark.slow
def test_every_mistake_gets_one_line_exit_2_and_leaves_nothing(world, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', JETMOE_TIMM_CACHE=str(tmp_path / 'cache'),
               HF_HOME=str(tmp_path / 'hf'), PYTHONWARNINGS='ignore')
    env.pop('JETMOE_TIMM_PREDECESSOR', None)
    rows = _rows(world)
    assert len(rows) >= 25
    (tmp_path / 'io').mkdir()
    results = _run_forked([argv for argv, _ in rows], env, tmp_path / 'io')
    # the forked runs are what the command itself prints: two rows (argparse's error, one found deep in convert)
    # through the real `python -m jetmoe_timm.tools.cli`
    for i in (next(i for i, (argv, _) in enumerate(rows) if '--methdo' in argv),
              next(i for i, (_, says) in enumerate(rows) if 'not a dense predecessor' in says)):
        real = _run(rows[i][0], env)
        assert (real.returncode, real.stderr) == (results[i].returncode, results[i].stderr), rows[i][0]
    for (argv, says), r in zip(rows, results):
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, (argv, r.stderr[-2000:])
        assert 'Traceback' not in r.stderr, (argv, r.stderr[-2000:])
        assert len(lines) == 1 and re.match(f'jetmoe-timm {argv[0]}( export)?: error: ', lines[0]), (argv, lines)
        assert says in lines[0], (argv, lines[0])
        assert not r.stdout.strip(), (argv, r.stdout)  # nothing before the error, such as a banner
    assert not (world / 'new').exists() and not list(world.glob('.new*'))  # nothing half-written
    assert (world / 'exists' / 'keep.txt').read_text() == 'keep' and (world / 'a_file').read_text() == 'x'
    assert sorted(p.name for p in (world / 'converted').iterdir()) == ['config.json', 'model.safetensors']
    assert not list((tmp_path / 'cache').rglob('*.safetensors'))


def test_interrupt_and_torch_load_errors_are_one_line(monkeypatch, capsys):
    """Ctrl-C ends a command with one line and exit code 130; torch's 'Error(s) in loading state_dict for X:' is
    followed by its first reason, which alone says what is wrong."""
    from jetmoe_timm.tools import cli, data

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, '_cmd_export', interrupted)
    assert cli.main(['data', 'export', 'fashion-mnist', 'out']) == 130
    assert capsys.readouterr().err.strip() == 'jetmoe-timm data: interrupted'

    def mismatched(args):
        raise RuntimeError('Error(s) in loading state_dict for VisionTransformerJetMoE:\n\tUnexpected key(s) in '
                           'state_dict: "head.weight".')
    monkeypatch.setattr(data, '_cmd_export', mismatched)
    assert cli.main(['data', 'export', 'fashion-mnist', 'out']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'VisionTransformerJetMoE: Unexpected key(s) in state_dict: "head.weight"' in err


def test_debug_shows_the_traceback_before_or_after_the_command(monkeypatch, capsys):
    """An error's line ends '(--debug shows the traceback)'; a user adds --debug at the end of the same command line
    as often as before the command, and both give the traceback (the exception itself)."""
    from jetmoe_timm.tools import cli, data

    def fails(args):
        raise TypeError('deep inside')
    monkeypatch.setattr(data, '_cmd_export', fails)
    assert cli.main(['data', 'export', 'fashion-mnist', 'out']) == 2
    assert capsys.readouterr().err.strip().endswith('TypeError: deep inside (--debug shows the traceback)')
    for argv in (['--debug', 'data', 'export', 'fashion-mnist', 'out'], ['data', 'export', 'fashion-mnist', 'out',
                                                                        '--debug']):
        with pytest.raises(TypeError, match='deep inside'):
            cli.main(argv)


def test_warnings_are_one_line_each(monkeypatch, capsys):
    """A warning during a command is one line as an error is ('jetmoe-timm CMD: warning: ...'), not Python's two
    (file:line: UserWarning: ..., then the source line that raised it); other categories are named."""
    import warnings
    from jetmoe_timm.tools import cli, data

    def warns(args):
        warnings.warn('calibration took 2 images')
        warnings.warn('old option', FutureWarning)
        return 0
    monkeypatch.setattr(data, '_cmd_export', warns)
    assert cli.main(['data', 'export', 'fashion-mnist', 'out']) == 0
    assert capsys.readouterr().err.splitlines() == [
        'jetmoe-timm data: warning: calibration took 2 images',
        'jetmoe-timm data: warning (FutureWarning): old option']
