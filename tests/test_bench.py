"""The benchmark machinery on tiny shapes (what it writes, not how fast), and SpheroMoE under torch.compile."""
import json
import platform
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from jetmoe_timm.tools import bench, cli
from jetmoe_timm.tools.bench import LayerShape, Pair, run_benchmark
from jetmoe_timm.layers import SpheroMoE

from conftest import TINY_VIT

TINY_PAIR = Pair('v_jetmoe_tiny', 'vit_tiny_patch16_224', model_kwargs=dict(TINY_VIT),
                 twin_kwargs=dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2),
                 input_size=(3, 32, 32))
TINY_LAYER = LayerShape(dim=16, tokens=9, num_core_experts=3, num_univ_experts=5, core_hidden=32,
                        slots_per_expert=2)


def test_run_benchmark_rows_and_json(tmp_path, monkeypatch):
    built, real_build = [], bench._build
    monkeypatch.setattr(bench, '_build', lambda *a: built.append(real_build(*a)) or built[-1])
    result = run_benchmark(
        pairs=[TINY_PAIR], batch_sizes=(2,), precisions=('float32', 'bf16'), torch_compile=(False,),
        layer=TINY_LAYER, layer_batch_sizes=(3,), compile_layer=False, rounds=2, warmup=0, log=lambda s: None)
    # one row per (mode, precision), each with both medians and their ratio
    assert {(r['mode'], r['precision']) for r in result['models']} == {
        (m, p) for m in ('infer', 'train') for p in ('float32', 'bf16')}
    for r in result['models']:
        assert r['model'] == 'v_jetmoe_tiny' and r['twin'] == 'vit_tiny_patch16_224' and r['batch'] == 2
        assert len(r['model_s']) == len(r['twin_s']) == 2
        assert r['ratio'] == pytest.approx(r['model_img_s'] / r['twin_img_s'])
    # the layer against its floor, forward and forward+backward, and the looped reference (forward only)
    cands = {(r['pass_'], r['candidate']) for r in result['layer']}
    assert cands == {('forward', 'floor (matmuls alone)'), ('forward', 'SpheroMoE'), ('forward', 'looped reference'),
                     ('forward+backward', 'floor (matmuls alone)'), ('forward+backward', 'SpheroMoE'),
                     ('forward+backward', 'SpheroMoE kept grads')}
    assert all(r['x_floor'] == 1 for r in result['layer'] if r['candidate'].startswith('floor'))
    # training-step memory: fused AdamW keeps two float32 moments per parameter (plus tiny step counters); the
    # lean option (AdafactorLean) only row and column second moments of each matrix (experts: (E, d) and (E, h))
    # one row per model, optimizer and training precision (float32 weights; bf16 is autocast over them), and for the
    # JetMoE model one per optimizer with the opt-in kept gradient memory (float32), whose buffers it counts
    assert sorted((r['model'], r['optimizer'], r['precision'], r['kept_grads']) for r in result['memory']) == sorted(
        [(m, o, p, False) for m in ('v_jetmoe_tiny', 'vit_tiny_patch16_224')
         for o in ('adamw', 'adafactorlean', 'lean-in-backward') for p in ('float32', 'bf16')]
        + [('v_jetmoe_tiny', o, 'float32', True) for o in ('adamw', 'adafactorlean')])
    from jetmoe_timm.layers import ExpertLinear
    expert_grads_gb = sum(m.weight.numel() * 4 for m in bench._build(
        TINY_PAIR.model, TINY_PAIR.model_kwargs, torch.device('meta')).modules() if isinstance(m, ExpertLinear)) / 2 ** 30
    for o in ('adamw', 'adafactorlean'):
        plain, kept = (next(r for r in result['memory'] if r['model'] == 'v_jetmoe_tiny' and r['optimizer'] == o
                            and r['precision'] == 'float32' and r['kept_grads'] == k) for k in (False, True))
        # the buffers are counted once, all through the step: they cost at most their own size over the plain step
        assert kept['params_gb'] == plain['params_gb'] and 0 < kept['step_peak_gb'] - plain['step_peak_gb'] <= (
            expert_grads_gb)
    # the step_in_backward rows leave no hook behind: later cells step their own optimizers
    assert not any(getattr(p, '_post_accumulate_grad_hooks', None) for model in built for p in model.parameters())
    experts = [m for model in built for m in model.modules() if isinstance(m, ExpertLinear)]
    assert experts and not any(m.keep_grad_memory or m._grad_buffer is not None for m in experts)  # off again
    for r in result['memory']:
        if r['optimizer'] == 'adamw':
            assert r['optimizer_state_gb'] == pytest.approx(2 * r['params_gb'], rel=0.02)
        else:
            assert 0 < r['optimizer_state_gb'] < 0.5 * r['params_gb']
        assert r['step_peak_gb'] > 0
        assert r['peak_gb'] == pytest.approx(r['params_gb'] + r['optimizer_state_gb'] + r['step_peak_gb'])
    assert result['meta']['threads'] >= 1 and result['convert'] == []
    # which CPU the figures come from, down to the generation and the vector ISA torch's kernels use
    assert f'torch CPU capability {torch.backends.cpu.get_cpu_capability()}' in result['meta']['cpu']
    if platform.machine() == 'x86_64':
        assert re.search(r'family \d+, model \d+', result['meta']['cpu'])
        with open('/proc/cpuinfo') as f:
            flags = set(next(line for line in f if line.startswith('flags')).split())
        assert ('bf16: none' in result['meta']['cpu']) == flags.isdisjoint(bench._BF16_FLAGS)
    path = tmp_path / 'bench.json'
    bench._write_json(result, str(path))
    assert json.loads(path.read_text())['layer'] == json.loads(json.dumps(result['layer']))
    table = bench.format_table(result)
    assert 'v_jetmoe_tiny / vit_tiny_patch16_224' in table and 'looped reference' in table


def test_layer_section_in_bf16_is_autocast_against_bfloat16_matmuls(monkeypatch):
    """--layer-precisions bf16: the layer runs under autocast (its experts compute in bfloat16) and its floor times
    the same matmuls on bfloat16 operands; the float32 section is unchanged beside it."""
    expert_dtypes = []
    real_build, real_floor = LayerShape.build, bench.MatmulFloor

    def build(self):
        layer = real_build(self)
        layer.core_experts.fc1.register_forward_hook(lambda m, i, o: expert_dtypes[-1].add(o.dtype))
        expert_dtypes.append(set())
        return layer
    floors = []
    monkeypatch.setattr(LayerShape, 'build', build)
    monkeypatch.setattr(bench, 'MatmulFloor', lambda *a, **k: floors.append(real_floor(*a, **k)) or floors[-1])
    result = run_benchmark(pairs=[], layer=TINY_LAYER, layer_batch_sizes=(3,), layer_precisions=('float32', 'bf16'),
                           compile_layer=False, rounds=1, warmup=0, memory=False, log=lambda s: None)
    assert expert_dtypes == [{torch.float32}, {torch.bfloat16}]
    assert [{a.dtype for ops in (f.forward_ops, f.backward_ops) for op in ops for a in op} for f in floors] == [
        {torch.float32}, {torch.bfloat16}]
    bf16 = {(r['pass_'], r['candidate']) for r in result['layer'] if r['precision'] == 'bf16'}
    assert bf16 == {(p, c) for p in ('forward', 'forward+backward') for c in ('floor (matmuls alone)', 'SpheroMoE')}
    assert [i['precision'] for i in result['layer_info']] == ['float32', 'bf16']
    assert 'SpheroMoE layer, bf16: batch 3' in bench.format_table(result)
    with pytest.raises(ValueError, match='Layer precisions'):
        run_benchmark(pairs=[], layer=TINY_LAYER, layer_precisions=('bf16-weights',))


def test_floor_has_the_layers_matmuls():
    """The floor times exactly the matmul work of the layer's forward (same MACs as the layer, counted)."""
    layer = TINY_LAYER.build().eval()
    B = 3
    floor = bench.MatmulFloor(layer, B, TINY_LAYER.tokens)
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(B, TINY_LAYER.tokens, TINY_LAYER.dim))
    matmul_ops = {'mm', 'bmm', 'baddbmm'}
    layer_flops = sum(n for op, n in counter.get_flop_counts()['Global'].items()
                      if op.__name__.split('.')[0] in matmul_ops)
    assert floor.macs * 2 == layer_flops
    assert len(floor.backward_ops) == 2 * len(floor.forward_ops)


def test_cli_quick_writes_json(tmp_path, monkeypatch, capsys):
    """`jetmoe-timm bench --quick` end to end, with the full-size models swapped for tiny ones."""
    monkeypatch.setattr(bench, 'DEFAULT_PAIRS', (TINY_PAIR,))
    monkeypatch.setattr(bench, 'V_JETMOE_TINY_LAYER', TINY_LAYER)
    out = tmp_path / 'b.json'
    rc = cli.main(['bench', '--quick', '--compile', 'off', '--batch-sizes', '2', '--layer-batch-sizes', '2',
                   '--rounds', '1', '--no-memory', '--out', str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result) == {'meta', 'models', 'memory', 'layer', 'layer_info', 'convert'}
    assert [(r['mode'], r['precision'], r['compile']) for r in result['models']] == [
        ('infer', 'float32', False), ('train', 'float32', False)]
    assert result['memory'] == [] and result['layer_info'][0]['graph_breaks'] is None
    assert result['meta']['config']['rounds'] == 1
    assert f'wrote {out}' in capsys.readouterr().out


def test_bf16_weights_is_inference_of_a_bfloat16_copy(tmp_path, monkeypatch):
    """'bf16-weights' times bfloat16 copies of both models on bfloat16 input (inference only, no gradients
    carried over from the float32 training cells) and leaves the float32 originals as they were."""
    monkeypatch.setattr(bench, 'DEFAULT_PAIRS', (TINY_PAIR,))
    built, timed = [], []
    real_build, real_runner = bench._build, bench.timed_runner
    monkeypatch.setattr(bench, '_build',
                        lambda name, kwargs, device: built.append(real_build(name, kwargs, device)) or built[-1])

    def spy_runner(model, mode, x, y, precision, opt):
        timed.append((precision, mode, {p.dtype for p in model.parameters()}, x.dtype,
                      any(p.grad is not None for p in model.parameters())))
        return real_runner(model, mode, x, y, precision, opt)
    monkeypatch.setattr(bench, 'timed_runner', spy_runner)
    out = tmp_path / 'b.json'
    rc = cli.main(['bench', '--precisions', 'float32', 'bf16-weights', '--compile',
                   'off', '--batch-sizes', '2', '--rounds', '1', '--no-memory', '--no-layer', '--out', str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert [(r['mode'], r['precision']) for r in result['models']] == [
        ('infer', 'float32'), ('train', 'float32'), ('infer', 'bf16-weights')]
    assert result['layer'] == [] and result['layer_info'] == []
    cast = [t for t in timed if t[0] == 'bf16-weights']
    assert len(cast) == 2  # the JetMoE model and its twin
    assert all(t[1:] == ('infer', {torch.bfloat16}, torch.bfloat16, False) for t in cast)
    assert len(built) == 2 and all(p.dtype == torch.float32 for m in built for p in m.parameters())
    assert 'bf16-weights' in bench.format_table(result)
    with pytest.raises(ValueError, match='inference only'):
        run_benchmark(pairs=[TINY_PAIR], precisions=('bf16-weights',), modes=('train',), layer=None)


def test_bf16_cached_times_the_opt_in_weight_copies(tmp_path, monkeypatch):
    """'bf16-cached' times autocast inference with the experts' weight copies kept between calls (the same copy in
    every timed call), and frees them after its cell; the other cells never see them."""
    from jetmoe_timm.layers import ExpertLinear
    monkeypatch.setattr(bench, 'DEFAULT_PAIRS', (TINY_PAIR,))
    seen, models = [], []
    real_runner = bench.timed_runner

    def spy_runner(model, mode, x, y, precision, opt):
        models.append(model)
        run = real_runner(model, mode, x, y, precision, opt)

        def timed():
            run()
            experts = [m for m in model.modules() if isinstance(m, ExpertLinear)]
            seen.append((precision, mode, tuple(id(m._autocast_copy) if m._autocast_copy else None for m in experts)))
        return timed
    monkeypatch.setattr(bench, 'timed_runner', spy_runner)
    out = tmp_path / 'b.json'
    rc = cli.main(['bench', '--precisions', 'bf16', 'bf16-cached', '--compile', 'off',
                   '--batch-sizes', '2', '--rounds', '2', '--no-memory', '--no-layer', '--out', str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())['models']
    assert [(r['mode'], r['precision']) for r in rows] == [('infer', 'bf16'), ('train', 'bf16'), ('infer', 'bf16-cached')]
    cached = [copies for p, _, copies in seen if p == 'bf16-cached' and copies]  # the JetMoE model's calls
    assert len(cached) == 3 and all(c == cached[0] for c in cached) and None not in cached[0]  # warm-up + 2 rounds
    assert all(all(c is None for c in copies) for p, _, copies in seen if p != 'bf16-cached')
    assert 'bf16-cached' in bench.format_table(json.loads(out.read_text()))
    experts = [m for model in models for m in model.modules() if isinstance(m, ExpertLinear)]
    assert experts and all(not m.cache_autocast_weights and m._autocast_copy is None for m in experts)  # freed


def test_bf16_cached_is_not_timed_compiled(monkeypatch):
    """The weight copies are eager-only: a compiled 'bf16-cached' cell would time plain bf16, so there is none."""
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: model)  # what is timed, not how it compiles
    result = run_benchmark(pairs=[TINY_PAIR], batch_sizes=(2,), precisions=('bf16', 'bf16-cached'), modes=('infer',),
                           torch_compile=(False, True), compile_batch_sizes=None, layer=None, memory=False, rounds=1,
                           warmup=0, log=lambda s: None)
    assert [(r['precision'], r['compile']) for r in result['models']] == [
        ('bf16', False), ('bf16-cached', False), ('bf16', True)]


def test_convert_child_reads_its_own_peak_rss():
    """The conversion child reports its own high-water mark, not the one it inherits from a big parent."""
    import subprocess
    import sys
    parent_pages = torch.ones(2 ** 27)  # 512 MiB touched here, in the parent
    helper = bench._CONVERT_CHILD.split('base = ')[0].replace('import jetmoe_timm', '')
    res = subprocess.run([sys.executable, '-c', helper + "print(status('VmHWM') / 2 ** 30)"], capture_output=True,
                         text=True, check=True)
    assert 0 < float(res.stdout) < 0.25
    del parent_pages


def test_step_memory_runs_the_step_in_its_precision(monkeypatch):
    """A bf16 memory row measures an autocast step (on the inputs' device), a float32 row a plain one."""
    torch.manual_seed(0)
    model = bench._build(TINY_PAIR.model, TINY_PAIR.model_kwargs)
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(2, *TINY_PAIR.input_size), torch.tensor([1, 2])
    seen, real_autocast = [], bench._autocast

    def spy(precision, device):
        seen.append((precision, device.type))
        return real_autocast(precision, device)
    monkeypatch.setattr(bench, '_autocast', spy)
    dtypes = []
    hook = model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    rows = {p: bench._train_step_memory(model, opt, x, y, p) for p in ('float32', 'bf16')}
    hook.remove()
    assert seen == [('float32', 'cpu'), ('bf16', 'cpu')] and dtypes == [torch.float32, torch.bfloat16]
    assert all(r['step_peak_gb'] > 0 for r in rows.values())
    assert rows['float32']['step_peak_gb'] != rows['bf16']['step_peak_gb']


def test_cli_keeps_the_sections_measured_before_a_failure(tmp_path, monkeypatch, capsys):
    """Results are written after every section: a pair that fails later (out of memory, say) leaves the earlier
    pairs' rows in the JSON file, and the CLI still answers with one line and exit code 2."""
    second = TINY_PAIR._replace(model='c_jetmoe_femto', model_kwargs={})
    monkeypatch.setattr(bench, 'PAIRS', (TINY_PAIR, second))
    real_build = bench._build

    def build(name, kwargs, device):
        if name == 'c_jetmoe_femto':
            raise RuntimeError('CUDA out of memory (simulated)')
        return real_build(name, kwargs, device)
    monkeypatch.setattr(bench, '_build', build)
    out = tmp_path / 'b.json'
    rc = cli.main(['bench', '--models', 'v_jetmoe_tiny', 'c_jetmoe_femto', '--compile', 'off', '--batch-sizes', '2',
                   '--precisions', 'float32', '--modes', 'infer', '--rounds', '1', '--no-memory', '--no-layer',
                   '--out', str(out)])
    assert rc == 2 and 'out of memory (simulated)' in capsys.readouterr().err
    rows = json.loads(out.read_text())['models']
    assert [(r['model'], r['mode']) for r in rows] == [('v_jetmoe_tiny', 'infer')]


def test_pairs_are_twins_of_every_variant():
    """Each registered variant has a pair, and its twin is the dense model of the same width and depth."""
    import timm
    assert {p.model for p in bench.PAIRS} == set(timm.list_models('*jetmoe*'))
    assert {p.model for p in bench.DEFAULT_PAIRS} == {'v_jetmoe_tiny', 'c_jetmoe_femto'}
    meta = torch.device('meta')
    for p in bench.PAIRS:
        model, twin = bench._build(p.model, p.model_kwargs, meta), bench._build(p.twin, p.twin_kwargs, meta)
        assert model.num_features == twin.num_features and model.num_classes == twin.num_classes == 1000
        depth = (lambda m: len(m.blocks) if hasattr(m, 'blocks') else [len(s.blocks) for s in m.stages])
        assert depth(model) == depth(twin), p.name
        assert all(t.device == meta for t in list(model.parameters()) + list(twin.parameters()))


@pytest.mark.parametrize('device, message', [
    ('cuda', 'torch sees no CUDA GPU here'), ('tpu', '--device tpu: unknown device; use cpu, cuda or cuda:N.'), ('meta', 'runs on cpu or cuda')])
def test_cli_rejects_a_device_it_cannot_use(tmp_path, monkeypatch, capsys, device, message):
    """One line that names the problem, exit 2, before any model is built, and no results file."""
    if device == 'cuda' and torch.cuda.is_available():
        pytest.skip('this machine has a CUDA GPU, so --device cuda is usable: the refusal is checked where none is')
    monkeypatch.setattr(bench, '_build', lambda *a: pytest.fail('a model was built before the device was checked'))
    out = tmp_path / 'b.json'
    assert cli.main(['bench', '--quick', '--device', device, '--out', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_cli_checks_the_results_path_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, '_build', lambda *a: pytest.fail('a model was built before --out was checked'))
    (tmp_path / 'a_file').write_text('x')
    for out, message in ((tmp_path / 'a_file' / 'b.json', 'a_file is a file'), (tmp_path, 'is a folder')):
        assert cli.main(['bench', '--quick', '--out', str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


def test_cli_rejects_unknown_model(tmp_path, capsys):
    assert cli.main(['bench', '--models', 'nope', '--out', str(tmp_path / 'b.json')]) == 2
    assert capsys.readouterr().err == ("jetmoe-timm bench: error: No benchmark pair for ['nope']; choose from "
                                       "['v_jetmoe_tiny', 'c_jetmoe_femto', 'v_jetmoe_small', 'c_jetmoe_tiny'].\n")
    with pytest.raises(SystemExit) as e:  # argparse's choices: every variant converts, nothing else
        cli.main(['bench', '--convert', 'v_jetmoe_huge', '--out', str(tmp_path / 'b.json')])
    assert e.value.code == 2
    assert "argument --convert: invalid choice: 'v_jetmoe_huge' (choose from 'c_jetmoe_femto'" in capsys.readouterr().err


def test_layer_compiles_without_graph_breaks():
    """One graph in eval and in train (noise on), and the compiled train graph's gradients match eager's.

    Dynamo (the part that finds graph breaks) and AOT autograd run for real; the backend is aot_eager, so no
    C++ compile is needed here (`jetmoe-timm bench` times the inductor build).
    """
    import torch._dynamo as dynamo
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    for routing in ('sphero', 'official'):  # softmax and entmax15 combine
        layer = SpheroMoE(16, num_core_experts=3, num_univ_experts=5, slots_per_expert=2, routing=routing)
        for train in (False, True):
            layer.train(train)
            dynamo.reset()
            explain = dynamo.explain(layer)(x)
            assert explain.graph_break_count == 0, explain.break_reasons
            assert explain.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    layer.train()
    out = compiled(x)  # the noise op traces (its fake kernel) and runs
    assert out.shape == x.shape and torch.isfinite(out).all()
    layer.noise_mult = 0.  # deterministic: compiled and eager forward and gradients agree
    grads = []
    for fn in (layer, compiled):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        fn(xg).square().sum().backward()
        grads.append([xg.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dynamo.reset()
