""" Speed benchmark: JetMoE models against their dense twins, and SpheroMoE against its own matmul floor.

    jetmoe-timm bench [--quick] [--out bench.json] [--device cuda]

Every figure is a median over rounds in which the candidates take turns (the order alternates each round), so
a machine shared with other work slows them alike; each ratio is also given from the fastest round of each
candidate ("best"), the figure least disturbed by bursts of other load. Sections:

  models  images/s of inference and of a full training step (forward, backward, fused AdamW step) for each
          JetMoE model and its dense twin, per batch size, precision (float32, bf16 autocast, and for inference
          bf16-weights: a bfloat16 copy of each model, and bf16-cached: autocast with the experts' opt-in weight
          copies, eager only) and torch.compile on/off; ratio = JetMoE / twin.
  layer   the SpheroMoE layer (forward in eval, forward+backward in train) against its floor: the same matmuls
          (logits, dispatch, experts, combine, and their gradients) with the same shapes, timed alone on
          contiguous operands into preallocated outputs (float32, or with --layer-precisions bf16 too: autocast
          against bfloat16 matmuls); the looped reference layer shows what batching buys.
          Also: graph breaks of the layer under torch.compile (eval and train).
  memory  peak tensor memory of a training step in each training precision asked for (float32 when only
          inference ones are): parameters + optimizer state + the step's own peak (activations, gradients,
          temporaries; on the CPU from the profiler's allocation events), with fused AdamW and with the memory-lean
          option (timm's Adafactor: factored second moment, no first moment); on the CPU in float32 also with the
          JetMoE model's opt-in kept expert-gradient memory.
  convert time and peak RSS of full-size conversions, per variant (only with --convert: minutes).

On a GPU (``--device cuda``) every timed call ends with a device synchronisation, autocast runs on the device and
training-step memory is the device allocator's peak; conversions run on the CPU wherever the rest runs.

Results go to a JSON file and a printed table (see docs/benchmark.md).
"""
import argparse
import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import get_pretrained_cfg

from ..atomic import write_atomic
from ..layers import SpheroMoE, set_autocast_weight_cache, set_keep_grad_memory, sphero_moe_reference
from ..recycle.build import RECYCLE_SOURCES, recycle_source
from .checks import check_device, check_output_folder

__all__ = ['Pair', 'LayerShape', 'PAIRS', 'DEFAULT_PAIRS', 'V_JETMOE_TINY_LAYER', 'interleaved_times', 'run_benchmark',
           'format_table', 'add_parser']


class Pair(NamedTuple):
    """A JetMoE model and the dense model it is compared with, each a timm name plus kwargs."""
    model: str
    twin: str
    model_kwargs: Dict = {}
    twin_kwargs: Dict = {}
    input_size: Tuple[int, int, int] = (3, 224, 224)

    @property
    def name(self) -> str:
        return f'{self.model} / {self.twin}'


class LayerShape(NamedTuple):
    """SpheroMoE layer arguments and the number of tokens it sees per image."""
    dim: int
    tokens: int
    num_core_experts: int
    num_univ_experts: int
    core_hidden: int
    univ_ratio: float = 0.25
    slots_per_expert: int = 1

    def build(self) -> SpheroMoE:
        return SpheroMoE(self.dim, self.num_core_experts, self.num_univ_experts, core_hidden=self.core_hidden,
                         univ_ratio=self.univ_ratio, slots_per_expert=self.slots_per_expert)


# every registered variant and the dense model of its width and depth; c_jetmoe_femto's twin is ConvNeXt-T at half
# width, not timm's convnext_femto (a different, shallower model)
PAIRS = (
    Pair('v_jetmoe_tiny', 'vit_tiny_patch16_224'),
    Pair('c_jetmoe_femto', 'convnext_tiny', twin_kwargs=dict(dims=(48, 96, 192, 384))),
    Pair('v_jetmoe_small', 'vit_small_patch16_224'),
    Pair('c_jetmoe_tiny', 'convnext_tiny'),
)
# what runs without --models: the two small variants (v_jetmoe_small and c_jetmoe_tiny need 17 and 25 GB for float32
# weights, gradients and AdamW state before any activation: ask for them by name, on a machine that holds them)
DEFAULT_PAIRS = tuple(p for p in PAIRS if p.model in ('v_jetmoe_tiny', 'c_jetmoe_femto'))
# one MoE block of v_jetmoe_tiny: 197 tokens of width 192, 98 core (768) + 196 universal (192) experts
V_JETMOE_TINY_LAYER = LayerShape(dim=192, tokens=197, num_core_experts=98, num_univ_experts=196, core_hidden=768)
# 'bf16' is autocast over float32 weights. Inference only: 'bf16-weights' runs a bfloat16 copy of the model, which
# skips autocast's per-forward cast of every weight (a cost that grows with the parameter count, not the FLOPs);
# 'bf16-cached' is autocast with the experts' opt-in weight copies (``set_autocast_weight_cache``), kept cast between
# calls
PRECISIONS = {'float32': None, 'bf16': torch.bfloat16, 'bf16-weights': torch.bfloat16, 'bf16-cached': torch.bfloat16}
_CAST_WEIGHTS = ('bf16-weights',)
_INFER_ONLY = ('bf16-weights', 'bf16-cached')
_REFERENCE_IMAGES = 4  # the looped reference is timed on this many images, then scaled to the batch


# --------------------------------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops return when done)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved_times(cands: Dict[str, Callable[[], None]], rounds: int, warmup: int,
                      device: torch.device = torch.device('cpu')) -> Dict[str, List[float]]:
    """Seconds per call of each candidate; candidates take turns, in alternating order, every round."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            _synchronize(device)
            t0 = time.perf_counter()
            cands[k]()
            _synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _autocast(precision: str, device: torch.device):
    dtype = PRECISIONS[precision]
    if dtype is None or precision in _CAST_WEIGHTS:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++ logging on fd 2 (the profiler's start/stop chatter), not Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --------------------------------------------------------------------------------------------------- models

def _build(name: str, kwargs: Dict, device: torch.device = torch.device('cpu')) -> nn.Module:
    import timm
    # an ImageNet-1k head on both sides (the JetMoE default configs have none: their tags are headless inits);
    # built on the device itself: no host copy of a billion-parameter model on the way to a GPU
    return timm.create_model(name, pretrained=False, **dict(dict(num_classes=1000, device=device), **kwargs))


def timed_runner(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, precision: str,
                 opt: Optional[torch.optim.Optimizer]) -> Callable[[], None]:
    if mode == 'infer':
        def run():
            with torch.inference_mode(), _autocast(precision, x.device):
                model(x)
    else:
        def run():
            opt.zero_grad(set_to_none=True)
            with _autocast(precision, x.device):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
    return run


@contextlib.contextmanager
def _switched_on(switch: Callable[[nn.Module, bool], None], models, enabled: bool = True):
    """One of the experts' opt-in kept memories (``set_autocast_weight_cache``, ``set_keep_grad_memory``) on for the
    models while the block runs (a no-op for dense ones), then off and freed."""
    if enabled:
        for m in models:
            switch(m, True)
    try:
        yield
    finally:
        if enabled:
            for m in models:
                switch(m, False)


# optimizers whose training-step memory is reported: fused AdamW (what the speed cells use) and the memory-lean
# option of docs/training.md, AdafactorLean (timm's Adafactor update: factored second moments, no first moment), also
# with step_in_backward=True ('lean-in-backward': each weight updated, its gradient freed, during backward)
MEMORY_OPTIMIZERS = ('adamw', 'adafactorlean', 'lean-in-backward')


def _optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2
    if name == 'lean-in-backward':
        return create_optimizer_v2(model, 'adafactorlean', lr=5e-4, weight_decay=0.05, step_in_backward=True)
    return create_optimizer_v2(model, name, lr=5e-4, weight_decay=0.05)


def _train_step_memory(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                       precision: str = 'float32') -> Dict:
    """Peak tensor bytes of one training step (the optimizer state already exists): on the CPU from the profiler's
    allocation events, on a GPU from the device allocator's peak."""
    model.train()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    opt.zero_grad(set_to_none=True)

    def step():
        with _autocast(precision, x.device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if x.device.type == 'cuda':
        _synchronize(x.device)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step()
        _synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - before
    else:
        from torch.profiler import ProfilerActivity, profile
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == '[memory]')
        live = peak = 0
        for _, nbytes in events:  # allocations are positive, frees negative
            live += nbytes
            peak = max(peak, live)
    # weight-gradient memory the experts keep between steps (opt-in) is live all through the step, unseen above
    kept = sum(m._grad_buffer.numel() * m._grad_buffer.element_size() for m in model.modules()
               if getattr(m, '_grad_buffer', None) is not None)
    gb = 2 ** -30
    return dict(params_gb=params * gb, optimizer_state_gb=state * gb, step_peak_gb=(peak + kept) * gb,
                peak_gb=(params + state + peak + kept) * gb)


def _bench_pair(pair: Pair, cfg: Dict, log: Callable[[str], None]) -> Tuple[List[Dict], List[Dict]]:
    """Rows of images/s (one per cell) and of training-step memory for one model pair."""
    rows, mem_rows = [], []
    device = cfg['device']
    models = {'model': _build(pair.model, pair.model_kwargs, device),
              'twin': _build(pair.twin, pair.twin_kwargs, device)}
    names = {'model': pair.model, 'twin': pair.twin}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.05, fused=True) for k, m in models.items()}
    compiled: Dict[Tuple[str, bool], nn.Module] = {}
    cast_models: Dict[str, nn.Module] = {}  # bfloat16 copies for 'bf16-weights', made on first use
    for batch in cfg['batch_sizes']:
        x = torch.randn(batch, *pair.input_size, device=device)
        y = torch.randint(0, models['model'].num_classes, (batch,), device=device)
        for compile_on in cfg['compile']:
            if compile_on and batch not in cfg['compile_batch_sizes']:
                continue
            for precision in cfg['precisions']:
                cast = precision in _CAST_WEIGHTS
                for mode in cfg['modes']:
                    if precision in _INFER_ONLY and mode == 'train':
                        continue  # training keeps float32 master weights: bf16 there means autocast
                    if precision == 'bf16-cached' and compile_on:
                        continue  # the weight copies are eager-only: compiled, the cell would time plain bf16
                    cands, compile_s = {}, {}
                    for k in models:
                        if cast:
                            if k not in cast_models:
                                m = copy.deepcopy(models[k])
                                m.zero_grad(set_to_none=True)  # the float32 training cells' gradients stay behind
                                cast_models[k] = m.to(PRECISIONS[precision])
                            m, xm = cast_models[k], x.to(PRECISIONS[precision])
                        else:
                            m, xm = models[k], x
                        m.train(mode == 'train')
                        if compile_on:
                            c = compiled.setdefault((k, cast), torch.compile(m))
                            run = timed_runner(c, mode, xm, y, precision, opts[k])
                            t0 = time.perf_counter()
                            run()  # compiles for this batch, precision and mode
                            _synchronize(device)
                            compile_s[k] = time.perf_counter() - t0
                        else:
                            run = timed_runner(m, mode, xm, y, precision, opts[k])
                        cands[k] = run
                    with _switched_on(set_autocast_weight_cache, models.values(), precision == 'bf16-cached'):
                        times = interleaved_times(cands, cfg['rounds'], cfg['warmup'], device)
                    ips = {k: batch / statistics.median(v) for k, v in times.items()}
                    row = dict(pair=pair.name, model=pair.model, twin=pair.twin, mode=mode, batch=batch,
                               precision=precision, compile=bool(compile_on), model_img_s=ips['model'],
                               twin_img_s=ips['twin'], ratio=ips['model'] / ips['twin'],
                               model_s=times['model'], twin_s=times['twin'])
                    if compile_on:
                        row['compile_s'] = compile_s
                    rows.append(row)
                    log(_format_model_row(row))
        if cfg['memory']:
            for opt_name in cfg['memory_optimizers']:
                for k, m in models.items():
                    opt = opts[k] if opt_name == 'adamw' else _optimizer(m, opt_name)
                    if not opt.state:  # a first step creates the optimizer state
                        timed_runner(m, 'train', x, y, cfg['memory_precisions'][0], opt)()
                    variants = [(precision, False) for precision in cfg['memory_precisions']]
                    if (k == 'model' and device.type == 'cpu' and 'float32' in cfg['memory_precisions']
                            and opt_name != 'lean-in-backward'):  # kept buffers would hold what it frees
                        # the opt-in kept expert-gradient memory (CPU, float32): what its speed costs at the peak
                        variants.append(('float32', True))
                    for precision, kept in variants:
                        with _switched_on(set_keep_grad_memory, [m], kept):
                            if kept:
                                timed_runner(m, 'train', x, y, precision, opt)()  # fills the kept buffers
                            mem = _train_step_memory(m, opt, x, y, precision)
                        mem_rows.append(dict(model=names[k], batch=batch, precision=precision, optimizer=opt_name,
                                             kept_grads=kept, **mem))
                        log(f"memory  {names[k]:24s} batch {batch:4d} {precision:8s} {opt_name:16s}: "
                            f"{mem['peak_gb']:.2f} GB" + (' with kept gradient memory' if kept else ''))
                    if opt_name == 'lean-in-backward':
                        opt.remove_hooks()  # the speed cells of the next batch size step their own optimizer
    return rows, mem_rows


# ---------------------------------------------------------------------------------------------------- layer

class MatmulFloor:
    """The layer's matmuls alone: same shapes, contiguous operands, preallocated outputs.

    Forward: logits (BN, d) @ (d, M); slots (B, M, N) @ (B, N, d); per expert path fc1 (E, SB, d) @ (E, d, h) and
    fc2 (E, SB, h) @ (E, h, d); combine (B, N, M) @ (B, M, d). Backward: for each C = A @ B, dA = dC @ B^T and
    dB = A^T @ dC (every operand of the layer's matmuls carries a gradient when the layer sits in a model).
    """

    def __init__(self, layer: SpheroMoE, batch: int, tokens: int, dtype=torch.float32, device=None):
        B, N, d, M, S = batch, tokens, layer.dim, layer.num_slots, layer.slots_per_expert
        shapes = [((B * N, d), (d, M)), ((B, M, N), (B, N, d))]
        for group in layer.expert_groups().values():
            E, h = group.num_experts, group.hidden_features
            shapes += [((E, S * B, d), (E, d, h)), ((E, S * B, h), (E, h, d))]
        shapes.append(((B, N, M), (B, M, d)))
        self.forward_ops, self.backward_ops = [], []
        for a_shape, b_shape in shapes:
            a, b = torch.randn(a_shape, dtype=dtype, device=device), torch.randn(b_shape, dtype=dtype, device=device)
            c = torch.empty(*a_shape[:-1], b_shape[-1], dtype=dtype, device=device)
            dc = torch.randn_like(c)
            self.forward_ops.append((a, b, c))
            self.backward_ops.append((dc, b.transpose(-1, -2).contiguous(), torch.empty_like(a)))  # dA
            self.backward_ops.append((a.transpose(-1, -2).contiguous(), dc, torch.empty_like(b)))  # dB
        self.macs = sum(a.shape[:-1].numel() * a.shape[-1] * b.shape[-1] for a, b, _ in self.forward_ops)

    @staticmethod
    def _run(ops):
        for a, b, out in ops:
            (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)

    def forward(self):
        self._run(self.forward_ops)

    def backward(self):
        self._run(self.backward_ops)

    def forward_backward(self):
        self.forward()
        self.backward()


def _graph_breaks(layer: SpheroMoE, x: torch.Tensor) -> Dict[str, int]:
    """Graph breaks torch._dynamo finds in the layer's forward, in eval and in train mode."""
    import torch._dynamo as dynamo
    out = {}
    for mode in ('eval', 'train'):
        layer.train(mode == 'train')
        dynamo.reset()
        out[mode] = dynamo.explain(layer)(x).graph_break_count
    dynamo.reset()
    return out


def _bench_layer(shape: LayerShape, batch: int, cfg: Dict, log: Callable[[str], None],
                 precision: str = 'float32') -> Tuple[List[Dict], Dict]:
    """The layer against its floor in one precision: float32, or bf16 autocast against bfloat16 matmuls (the
    routing stays float32 inside the layer, by design). Graph breaks and the looped reference: float32 only."""
    torch.manual_seed(0)
    device = cfg['device']
    layer = shape.build().to(device)
    x = torch.randn(batch, shape.tokens, shape.dim, device=device)
    x_grad = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    floor = MatmulFloor(layer, batch, shape.tokens, dtype=PRECISIONS[precision] or torch.float32, device=device)

    def fwd(m):
        def run():
            with torch.inference_mode(), _autocast(precision, device):
                m(x)
        return run

    def fwd_bwd(m):
        def run():
            m.zero_grad(set_to_none=True)  # a fresh step: gradients are not accumulated
            x_grad.grad = None
            with _autocast(precision, device):
                out = m(x_grad)
            out.backward(dy)
        return run

    full = precision == 'float32'
    info = dict(batch=batch, precision=precision, floor_gmacs_forward=floor.macs / 1e9, graph_breaks=None)
    use_compile = cfg['compile_layer']
    if use_compile:
        if full:
            info['graph_breaks'] = _graph_breaks(layer, x[:2])
        compiled = torch.compile(layer, fullgraph=True)
    rows = []
    for pass_name, mode in (('forward', 'eval'), ('forward+backward', 'train')):
        layer.train(mode == 'train')
        make = fwd if mode == 'eval' else fwd_bwd
        cands = {'floor (matmuls alone)': floor.forward if mode == 'eval' else floor.forward_backward,
                 'SpheroMoE': make(layer)}
        if mode == 'train' and device.type == 'cpu' and full:  # the opt-in kept gradient memory (CPU, float32)
            kept = copy.deepcopy(layer)
            set_keep_grad_memory(kept, True)
            cands['SpheroMoE kept grads'] = make(kept)
        if use_compile:
            t0 = time.perf_counter()
            make(compiled)()
            _synchronize(device)
            info[f'compile_s_{mode}'] = time.perf_counter() - t0
            cands['SpheroMoE compiled'] = make(compiled)
        times = interleaved_times(cands, cfg['rounds'], cfg['warmup'], device)
        if mode == 'eval' and cfg['reference'] and full:
            # The looped reference runs B * E tiny expert calls, each image on its own: its time is linear in
            # the batch, so it is timed on a few images and scaled to the batch (fewer rounds, not interleaved).
            sub = min(batch, _REFERENCE_IMAGES)

            def reference():
                with torch.no_grad():
                    sphero_moe_reference(layer, x[:sub])
            # one warm-up call: a cold first call (allocator, caches) took up to 25x a warm one, times the batch
            t = interleaved_times({'r': reference}, cfg['reference_rounds'], 1, device)['r']
            times['looped reference'] = [v * batch / sub for v in t]
            info['reference_images'] = sub
        base = statistics.median(times['floor (matmuls alone)'])
        for name, t in times.items():
            med = statistics.median(t)
            row = dict(batch=batch, precision=precision, pass_=pass_name, candidate=name, ms=med * 1e3,
                       x_floor=med / base, seconds=t)
            rows.append(row)
            log(f"layer   {precision:8s} {pass_name:16s} {name:22s} {row['ms']:9.1f} ms  {row['x_floor']:6.2f} x floor "
                '(median)')
    return rows, info


# -------------------------------------------------------------------------------------------------- convert

# Each conversion runs in a fresh process. Peak RSS is the child's own VmHWM (its ru_maxrss would also count
# the benchmark parent's pages, which Linux folds into the high-water mark when the forked child execs Python);
# `base` is its RSS once torch, timm and jetmoe_timm are imported (0.7 GB of libraries, shared and file-backed),
# so `above` = peak - base is what the conversion itself needs: the target is above <= 1.3 x successor + predecessor.
_CONVERT_CHILD = r'''
import json, sys, time
import jetmoe_timm


def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))


base = status('VmRSS')
t0 = time.perf_counter()
jetmoe_timm.convert(sys.argv[3], sys.argv[2], predecessor=sys.argv[1], method=sys.argv[4],
                    num_calib=int(sys.argv[5]), progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak=status('VmHWM'), base=base)))
'''


def _convert_sources(names) -> Dict[str, Tuple[str, int]]:
    """variant or tag -> (the dense architecture its weights are recycled from, that checkpoint's class count: the
    in21k / in22k / in1k heads)."""
    sources = {}
    for name in names:
        predecessor = recycle_source(name)[1]['predecessor']
        sources[name] = (predecessor.partition('.')[0], get_pretrained_cfg(predecessor).num_classes)
    return sources


CONVERT_VARIANTS = _convert_sources(pair.model for pair in PAIRS)  # each variant's default tag, as PAIRS orders them
CONVERT_SOURCES = dict(CONVERT_VARIANTS, **_convert_sources(sorted(RECYCLE_SOURCES)))  # and every recycled tag by name


def _bench_convert(model: str, method: str = 'importance', num_calib: int = 256) -> Dict:
    """Full-size ``model`` from a (randomly initialised) file of its predecessor's architecture, with its in21k /
    in22k head, in a fresh process: seconds, peak RSS, and the bytes of the successor and the predecessor."""
    import timm
    from safetensors.torch import save_file
    arch, classes = CONVERT_SOURCES[model]
    with tempfile.TemporaryDirectory() as tmp:
        pred = timm.create_model(arch, num_classes=classes)
        pred_file = os.path.join(tmp, f'{arch}.safetensors')
        save_file({k: v.contiguous() for k, v in pred.state_dict().items()}, pred_file)
        del pred
        out = os.path.join(tmp, 'out')
        res = subprocess.run([sys.executable, '-c', _CONVERT_CHILD, pred_file, out, model, method,
                              str(num_calib)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f'conversion benchmark of {model} failed:\n{res.stderr[-2000:]}')
        m = json.loads(res.stdout.strip().splitlines()[-1])
        successor, predecessor = os.path.getsize(os.path.join(out, 'model.safetensors')), os.path.getsize(pred_file)
    gb = 2 ** 30
    above = (m['peak'] - m['base']) / gb
    bound = (1.3 * successor + predecessor) / gb
    return dict(model=model, predecessor=arch, method=method, num_calib=num_calib, seconds=m['seconds'],
                peak_rss_gb=m['peak'] / gb, base_rss_gb=m['base'] / gb, above_base_gb=above,
                successor_gb=successor / gb, predecessor_gb=predecessor / gb, bound_gb=bound, met=above <= bound)


# --------------------------------------------------------------------------------------------------- driver

# settings that change CPU timings: recorded with the results
_ENV_KEYS = ('THP_MEM_ALLOC_ENABLE', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'LD_PRELOAD', 'KMP_AFFINITY',
             'MALLOC_MMAP_THRESHOLD_', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_')


def _device(name: str) -> torch.device:
    """The benchmark's device, checked before anything is built."""
    dev = check_device(name)
    if dev.type not in ('cpu', 'cuda'):
        raise ValueError(f"--device {name}: the benchmark runs on cpu or cuda.")
    return dev


_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')  # /proc/cpuinfo flags of the bf16 dot-product instructions


def _cpu_name() -> str:
    """The CPU as the figures depend on it: its name, x86 family / model (one name covers several generations:
    'AMD EPYC' was a Zen 5 in one session and a Zen 4 in the next, with other kernel rates), the vector ISA
    torch's kernels use and the bf16 instructions the CPU has."""
    fields = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if not key.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get('model name') or platform.processor() or platform.machine()
    details = [f"family {fields['cpu family']}, model {fields['model']}"] if 'cpu family' in fields else []
    details.append(f'torch CPU capability {torch.backends.cpu.get_cpu_capability()}')
    if 'flags' in fields:
        # bf16 instructions decide the bf16 rows: the same family and model came with and without avx512_bf16
        flags = set(fields['flags'].split())
        details.append('bf16: ' + (', '.join(f for f in _BF16_FLAGS if f in flags) or 'none'))
    return f"{name} ({'; '.join(details)})"


def _check_runs(precisions: Sequence[str], modes: Sequence[str]) -> None:
    """Refuse precisions and modes that name nothing, or nothing to time together (before the CLI's banner)."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"Unknown precision '{p}'; choose from {sorted(PRECISIONS)}.")
    for m in modes:
        if m not in ('infer', 'train'):
            raise ValueError(f"Unknown mode '{m}'; choose 'infer' or 'train'.")
    if 'infer' not in modes and all(p in _INFER_ONLY for p in precisions):
        raise ValueError(f'{list(precisions)} time inference only: add the infer mode or a training precision '
                         '(float32, bf16).')


def run_benchmark(
        pairs: Sequence[Pair] = DEFAULT_PAIRS,
        batch_sizes: Sequence[int] = (32, 64, 128),
        precisions: Sequence[str] = ('float32', 'bf16'),
        modes: Sequence[str] = ('infer', 'train'),
        torch_compile: Sequence[bool] = (False, True),
        compile_batch_sizes: Optional[Sequence[int]] = (64,),
        layer: Optional[LayerShape] = V_JETMOE_TINY_LAYER,
        layer_batch_sizes: Sequence[int] = (64,),
        layer_precisions: Sequence[str] = ('float32',),
        reference: bool = True,
        compile_layer: bool = True,
        memory: bool = True,
        memory_optimizers: Sequence[str] = MEMORY_OPTIMIZERS,
        convert: Sequence[str] = (),
        rounds: int = 5,
        warmup: int = 1,
        reference_rounds: int = 2,
        threads: Optional[int] = None,
        device: str = 'cpu',
        log: Callable[[str], None] = print,
        on_section: Optional[Callable[[Dict], None]] = None,
) -> Dict:
    """Run the benchmark and return its results (see the module docstring for the sections).

    ``torch_compile``: time the models eager (False), compiled (True) or both; ``compile_batch_sizes``: the batch
    sizes at which they are also timed compiled (None: all). ``compile_layer``: also time the layer compiled.
    ``device``: where the models and the layer run ('cpu', 'cuda', 'cuda:1'); conversions always run on the CPU.
    ``on_section``: called with the results so far after each section (the CLI writes them, so a run that fails
    later, e.g. out of GPU memory on a big variant, keeps what it measured).
    """
    _check_runs(precisions, modes)
    if any(p not in ('float32', 'bf16') for p in layer_precisions):
        raise ValueError(f'Layer precisions are float32 and bf16 (autocast), not {list(layer_precisions)}.')
    if rounds < 1 or any(b < 1 for b in list(batch_sizes) + list(layer_batch_sizes)):
        raise ValueError('rounds and batch sizes must be >= 1.')
    if threads is not None and threads < 1:
        raise ValueError(f'--threads {threads}: give at least 1 thread, or leave it out for torch\'s own number.')
    dev = _device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = dict(batch_sizes=list(batch_sizes), precisions=list(precisions), modes=list(modes),
               compile=list(dict.fromkeys(bool(c) for c in torch_compile)),
               compile_batch_sizes=list(batch_sizes if compile_batch_sizes is None else compile_batch_sizes),
               reference=reference, compile_layer=compile_layer, memory=memory,
               memory_optimizers=list(memory_optimizers),
               memory_precisions=[p for p in precisions if p not in _INFER_ONLY] or ['float32'], rounds=rounds,
               warmup=warmup,
               reference_rounds=reference_rounds, layer_precisions=list(layer_precisions), device=dev)
    from ..version import __version__
    import timm
    t_start = time.perf_counter()
    result = dict(
        meta=dict(date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                  command=' '.join(sys.argv), cpu=_cpu_name(), threads=torch.get_num_threads(),
                  torch=torch.__version__, timm=timm.__version__, jetmoe_timm=__version__,
                  python=platform.python_version(), device=str(dev),
                  gpu=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'none used (CPU benchmark)',
                  env={k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
                  loadavg_start=list(os.getloadavg()), config=dict(cfg, device=str(dev))),
        models=[], memory=[], layer=[], layer_info=[], convert=[])
    sections = result['meta']['section_seconds'] = {}

    def section_done(name: str, t0: float) -> None:
        sections[name] = time.perf_counter() - t0
        if on_section is not None:
            on_section(result)
    for shape_batch in (layer_batch_sizes if layer is not None else ()):
        for precision in layer_precisions:
            t0 = time.perf_counter()
            rows, info = _bench_layer(layer, shape_batch, cfg, log, precision)
            result['layer'] += rows
            result['layer_info'].append(dict(info, shape=layer._asdict()))
            section_done(f'layer batch {shape_batch} {precision}', t0)
    for pair in pairs:
        t0 = time.perf_counter()
        rows, mem_rows = _bench_pair(pair, cfg, log)
        result['models'] += rows
        result['memory'] += mem_rows
        section_done(pair.name, t0)
    for model in convert:
        log(f'convert: full-size {model} from {CONVERT_SOURCES[model][0]} (minutes)...')
        t0 = time.perf_counter()
        result['convert'].append(_bench_convert(model))
        section_done(f'convert {model}', t0)
    result['meta'].update(loadavg_end=list(os.getloadavg()), seconds=time.perf_counter() - t_start)
    return result


def _format_model_row(r: Dict) -> str:
    best = min(r['twin_s']) / min(r['model_s'])  # fastest round of each: the least disturbed by other load
    return (f"{r['pair']:40s} {r['mode']:5s} {r['batch']:5d} {r['precision']:12s} {'on' if r['compile'] else 'off':3s}"
            f" {r['model_img_s']:8.1f} {r['twin_img_s']:8.1f} {r['ratio']:6.2f} {best:6.2f}")


def format_table(result: Dict) -> str:
    """The results as plain-text tables (what ``jetmoe-timm bench`` prints at the end)."""
    meta = result['meta']
    rounds = meta['config']['rounds']
    lines = [f"jetmoe-timm bench  {meta['date']}  {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
             f"timm {meta['timm']}; load average {meta['loadavg_start'][0]:.1f} -> "
             f"{meta.get('loadavg_end', [float('nan')])[0]:.1f}; "
             + (f"on {meta['gpu']} ({meta['device']})" if meta.get('device', 'cpu') != 'cpu' else 'no GPU used')]
    if result['models']:
        lines += ['', f'Models: images/s, median of {rounds} interleaved rounds; ratio = JetMoE / dense twin '
                      f'(best: the ratio of each model\'s fastest round); cmp: torch.compile',
                  f"{'pair':40s} {'mode':5s} {'batch':>5s} {'prec':12s} {'cmp':3s} {'JetMoE':>8s} {'twin':>8s} "
                  f"{'ratio':>6s} {'best':>6s}"]
        lines += [_format_model_row(r) for r in result['models']]
    for info in result['layer_info']:
        s = info['shape']
        precision = info.get('precision', 'float32')  # results written before layer precisions: float32
        lines += ['', f"SpheroMoE layer, {precision}: batch {info['batch']}, {s['tokens']} tokens, d={s['dim']}, "
                      f"{s['num_core_experts']}x{s['core_hidden']} core + {s['num_univ_experts']}x"
                      f"{int(round(s['core_hidden'] * s['univ_ratio']))} universal experts, "
                      f"{s['slots_per_expert']} slot(s) each; floor = its matmuls alone "
                      f"({info['floor_gmacs_forward']:.2f} GMACs forward, 3x that forward+backward)",
                  f"{'pass':16s} {'candidate':22s} {'ms':>9s} {'x floor':>8s} {'best':>6s}"]
        rows = [r for r in result['layer']
                if r['batch'] == info['batch'] and r.get('precision', 'float32') == precision]
        floor_best = {r['pass_']: min(r['seconds']) for r in rows if r['candidate'].startswith('floor')}
        lines += [f"{r['pass_']:16s} {r['candidate']:22s} {r['ms']:9.1f} {r['x_floor']:8.2f} "
                  f"{min(r['seconds']) / floor_best[r['pass_']]:6.2f}" for r in rows]
        if info.get('reference_images'):
            lines.append(f"(looped reference timed on {info['reference_images']} images, scaled to the batch: its "
                         f"cost is linear in the batch)")
        if info['graph_breaks'] is not None:
            lines.append(f"torch.compile graph breaks inside the layer: eval {info['graph_breaks']['eval']}, "
                         f"train {info['graph_breaks']['train']}")
    if result['memory']:
        lines += ['', 'Training-step memory: parameters + optimizer state + step peak; adamw is fused AdamW, '
                      'adafactorlean the memory-lean option (docs/training.md), lean-in-backward the same with '
                      'step_in_backward=True; kept: the opt-in kept expert-gradient memory (set_keep_grad_memory), '
                      'counted all through the step',
                  f"{'model':24s} {'batch':>5s} {'prec':8s} {'optimizer':16s} {'kept':4s} {'params':>8s} "
                  f"{'state':>8s} {'step':>8s} {'peak GB':>8s}"]
        lines += [f"{r['model']:24s} {r['batch']:5d} {r['precision']:8s} {r.get('optimizer', 'adamw'):16s} "
                  f"{'yes' if r.get('kept_grads') else 'no':4s} {r['params_gb']:8.2f} "
                  f"{r['optimizer_state_gb']:8.2f} {r['step_peak_gb']:8.2f} {r['peak_gb']:8.2f}"
                  for r in result['memory']]
    if result['convert']:
        lines += ['', f"Conversion ({result['convert'][0]['method']}, {result['convert'][0]['num_calib']} calibration "
                      f"images, from a full-size predecessor file): peak RSS above the process after its imports "
                      f"(base) against the target 1.3 x successor + predecessor",
                  f"{'model':16s} {'predecessor':24s} {'s':>6s} {'succ GB':>8s} {'pred GB':>8s} {'base':>6s} "
                  f"{'peak':>6s} {'above':>6s} {'bound':>6s} met"]
        lines += [f"{c['model']:16s} {c['predecessor']:24s} {c['seconds']:6.0f} {c['successor_gb']:8.2f} "
                  f"{c['predecessor_gb']:8.2f} {c['base_rss_gb']:6.2f} {c['peak_rss_gb']:6.2f} "
                  f"{c['above_base_gb']:6.2f} {c['bound_gb']:6.2f} {'yes' if c['met'] else 'NO'}"
                  for c in result['convert']]
    return '\n'.join(lines)


def _write_json(result: Dict, path: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))


def _check_counts(args, batch_sizes: List[int]) -> None:
    """Counts the run cannot use, said before anything is created (a 0 was taken as 'the default' before)."""
    for flag, value in (('--rounds', args.rounds), ('--threads', args.threads)):
        if value is not None and value < 1:
            raise ValueError(f'{flag} {value}: give at least 1, or leave {flag} out for the default.')
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    if args.threads is not None and cores and args.threads > cores:  # oversubscribed: every figure would be noise
        raise ValueError(f'--threads {args.threads}: this process may run on {cores} cores; give at most {cores}, or '
                         f'leave --threads out for the default.')
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f'batch sizes must be at least 1, got {sorted({b for b in batch_sizes if b < 1})}.')


def _run(args) -> int:
    quick = args.quick
    if os.path.isdir(args.out):
        raise ValueError(f'--out {args.out} is a folder: give the results file, e.g. {os.path.join(args.out, "bench.json")}.')
    check_output_folder(os.path.dirname(os.path.abspath(args.out)), overwrite=False, flag='--out folder')
    # --quick: the ViT pair only (building and timing the 391 M-parameter C-JetMoE takes another minute)
    pairs = [p for p in PAIRS if p.model in args.models] if args.models else list(
        DEFAULT_PAIRS[:1] if quick else DEFAULT_PAIRS)
    unknown = set(args.models or ()) - {p.model for p in PAIRS}
    if unknown:
        raise ValueError(f"No benchmark pair for {sorted(unknown)}; choose from {[p.model for p in PAIRS]}.")
    batch_sizes = args.batch_sizes or ([32] if quick else [32, 64, 128])
    compile_mode = args.compile or ('layer' if quick else 'all')
    compile_batch_sizes = args.compile_batch_sizes or ([64] if 64 in batch_sizes else batch_sizes[:1])
    layer_batch_sizes = args.layer_batch_sizes or ([32] if quick else [64])
    _check_counts(args, batch_sizes + layer_batch_sizes + compile_batch_sizes)
    if compile_mode == 'all' and not set(compile_batch_sizes) <= set(batch_sizes):
        raise ValueError(f'--compile-batch-sizes {sorted(set(compile_batch_sizes) - set(batch_sizes))} are not among '
                         f'the batch sizes {batch_sizes}: models are compiled only at sizes they are timed at.')
    precisions = args.precisions or (['float32'] if quick else ['float32', 'bf16'])
    _check_runs(precisions, args.modes)
    _device(args.device)
    # torch.compile imports cpp_extension, which warns on every CPU-only machine that it found no CUDA runtime
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # after every argument is checked
    print(f'Each result is printed as it is measured; the tables follow at the end ({args.out}).', flush=True)
    result = run_benchmark(
        log=lambda line: print(f'  {line}', flush=True),
        pairs=pairs,
        batch_sizes=batch_sizes,
        precisions=precisions,
        modes=args.modes,
        torch_compile=(False, True) if compile_mode == 'all' else (False,),
        compile_batch_sizes=compile_batch_sizes,
        layer=None if args.no_layer else V_JETMOE_TINY_LAYER,
        layer_batch_sizes=layer_batch_sizes,
        layer_precisions=args.layer_precisions,
        reference=not args.no_reference,
        compile_layer=compile_mode != 'off',
        memory=not args.no_memory,
        convert=list(CONVERT_VARIANTS) if args.convert == [] else args.convert or [],
        rounds=args.rounds if args.rounds is not None else (3 if quick else 7),
        warmup=1,
        reference_rounds=1 if quick else 2,
        threads=args.threads,
        device=args.device,
        on_section=lambda partial: _write_json(partial, args.out),
    )
    _write_json(result, args.out)
    print()
    print(format_table(result))
    print(f'\nwrote {args.out}')
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jetmoe-timm bench``."""
    p = subparsers.add_parser(
        'bench', help='speed: JetMoE models vs their dense twins, SpheroMoE vs its matmul floor',
        description='Time JetMoE models against their dense twins (inference and fused-AdamW training, '
                    'float32 / bf16 autocast / bf16 weights / bf16 with the opt-in weight copies, eager / '
                    'torch.compile) and the SpheroMoE layer '
                    'against its matmul floor and the looped reference; write JSON and print a table (see '
                    'docs/benchmark.md). '
                    'Candidates are interleaved and medians reported, so a busy machine slows them alike.')
    p.add_argument('--quick', action='store_true',
                   help='v_jetmoe_tiny pair only, batch 32, float32, eager models, 3 rounds (under 2 minutes)')
    p.add_argument('--out', default='bench.json', help='JSON results file (default: ./bench.json)')
    p.add_argument('--models', nargs='+', metavar='NAME',
                   help=f'JetMoE models to compare with their twins, from {[q.model for q in PAIRS]} '
                        f'(default: {" ".join(q.model for q in DEFAULT_PAIRS)}; --quick: the first)')
    p.add_argument('--batch-sizes', nargs='+', type=int, metavar='B', help='model batch sizes (default: 32 64 128)')
    p.add_argument('--precisions', nargs='+', choices=sorted(PRECISIONS),
                   help="default: float32 bf16 (autocast); inference only: 'bf16-weights', a bfloat16 copy of "
                        "each model, and 'bf16-cached', autocast with the experts' opt-in weight copies "
                        '(set_autocast_weight_cache)')
    p.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    p.add_argument('--compile', choices=('off', 'layer', 'all'),
                   help="torch.compile: 'off', 'layer' (the layer also compiled; --quick default) or 'all' (models "
                        "too, eager and compiled side by side; default)")
    p.add_argument('--compile-batch-sizes', nargs='+', type=int, metavar='B',
                   help='batch sizes at which models are also compiled (default: 64)')
    p.add_argument('--layer-batch-sizes', nargs='+', type=int, metavar='B', help='layer batch sizes (default: 64)')
    p.add_argument('--layer-precisions', nargs='+', choices=('float32', 'bf16'), default=['float32'],
                   help='layer section precisions: float32 (default) and/or bf16 autocast against bfloat16 matmuls')
    p.add_argument('--rounds', type=int, help='interleaved rounds per measurement (default: 7, quick: 3)')
    p.add_argument('--threads', type=int, help='torch threads (default: torch\'s)')
    p.add_argument('--device', default='cpu',
                   help='where models and layer run: cpu (default), cuda or cuda:N (conversions stay on the CPU)')
    p.add_argument('--no-reference', action='store_true', help='skip the (slow) looped reference layer')
    p.add_argument('--no-memory', action='store_true', help='skip the training-step memory measurement')
    p.add_argument('--no-layer', action='store_true', help='skip the SpheroMoE layer section')
    p.add_argument('--convert', nargs='*', choices=sorted(CONVERT_SOURCES), metavar='NAME',
                   help='also convert full-size models from predecessor files and report time and peak RSS: the '
                        f'NAMEs given (a variant, its default tag, or a recycled tag such as '
                        f'v_jetmoe_tiny.recycled_deit3_in22k), or all {len(CONVERT_VARIANTS)} variants '
                        f'({", ".join(CONVERT_VARIANTS)}; about 15 minutes on 2 cores)')
    p.set_defaults(func=_run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='jetmoe-timm')
    add_parser(parser.add_subparsers(dest='command', required=True))
    return _run(parser.parse_args(['bench'] + list(sys.argv[1:] if argv is None else argv)))
