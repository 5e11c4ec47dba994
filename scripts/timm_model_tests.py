""" Run timm's own model test suite (tests/test_models.py of the installed timm version) on the JetMoE models.

The suite is not in the timm wheel: this downloads timm's sdist of the installed version with pip (a package
registry, like any install), unpacks its tests into a scratch folder, registers the JetMoE models in its conftest,
and lists V-JetMoE among timm's ViTs (NON_STD_FILTERS), as timm does for its own. Tests that load pretrained
weights from the Hub are deselected (no network); so are the two largest models unless --all-models (all four:
33 tests, 5 min and a 13.3 GB peak on 2 CPU cores).

    python scripts/timm_model_tests.py [--all-models] [--keep DIR] [-- extra pytest args]
"""
import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

ANCHOR = "    'gemma4_vit*', 'qwen3_vit*', 'efficientvim*', 'deepseek_vit*',\n]\nNUM_NON_STD"
SMALL_MODELS = ('v_jetmoe_tiny', 'c_jetmoe_femto')


def prepare(folder: Path) -> Path:
    """Download and patch timm's tests into ``folder``; returns the tests folder."""
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', f'timm=={timm.__version__}', '--no-deps',
                    '--no-binary', ':all:', '-d', str(folder)], check=True)
    (sdist,) = folder.glob('timm-*.tar.gz')
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if '/tests/' in m.name]
        tar.extractall(folder, members=members, filter='data')
    tests = next(folder.glob('timm-*/tests'))
    suite = tests / 'test_models.py'
    text = suite.read_text()
    if ANCHOR not in text:
        sys.exit(f'timm {timm.__version__}: NON_STD_FILTERS in {suite} changed; update ANCHOR in {__file__}')
    suite.write_text(text.replace(ANCHOR, ANCHOR.replace("\n]", "\n    'v_jetmoe_*',  # jetmoe_timm: a timm ViT\n]")))
    conftest = tests / 'conftest.py'
    conftest.write_text(CONFTEST_HEAD + conftest.read_text())
    return tests


# prepended to timm's conftest.py: registers the JetMoE models, and collects reference cycles after every test.
# torch.jit.script and FX tracing leave the model they were given in cycles (a dense timm ViT too): without a
# collection the 6 GB of c_jetmoe_tiny from one test are still held when the next builds its own, and the
# --all-models run is killed for memory on a 24 GB machine (every test alone peaks at 13.1 GB). A failing test's
# traceback still holds its model until pytest lets the report go.
CONFTEST_HEAD = '''import gc as _jetmoe_gc

import jetmoe_timm  # noqa: F401  (registers the JetMoE models)
import pytest as _jetmoe_pytest


@_jetmoe_pytest.fixture(autouse=True)
def _collect_cycles():
    yield
    _jetmoe_gc.collect()


'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--all-models', action='store_true', help='also v_jetmoe_small and c_jetmoe_tiny (1-1.6 B params)')
    p.add_argument('--keep', type=Path, default=None, help='prepare the tests in this folder and keep them')
    p.add_argument('pytest_args', nargs='*', help='extra pytest arguments (after --)')
    args = p.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix='timm_model_tests_'))
    folder.mkdir(parents=True, exist_ok=True)
    tests = prepare(folder)
    from jetmoe_timm.models import list_jetmoe_models
    models = list_jetmoe_models() if args.all_models else SMALL_MODELS
    select = f"({' or '.join(models)}) and not pretrained"  # no Hub downloads
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-W', 'ignore', 'test_models.py',
           '-k', select, *args.pytest_args]
    print(f'timm {timm.__version__} model tests on {", ".join(models)}: {" ".join(cmd[2:])}', flush=True)
    return subprocess.run(cmd, cwd=tests).returncode


if __name__ == '__main__':
    sys.exit(main())
