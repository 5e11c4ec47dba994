""" Peak memory of timm's own train.py per variant: what a user's training run holds, not a model-only figure.

Each run is a fresh `python -m jetmoe_timm.train` process (timm's train.py, CPU) on a small synthetic image folder,
one epoch of a few steps, without validation; reported: the process's peak RSS (the kernel's ru_maxrss for that
child, so the loader, the weights, their gradients, the optimizer state, the activations and what the allocator
keeps all count) and the median step time train.py logs (data loading included, the first step left out).
Optimizers: `adamw` (train.py's default AdamW: torch's single-tensor loop on the CPU), `adamw-fused` (`--opt-kwargs
fused=True`), timm's `adafactor`, and the memory-lean option of docs/training.md, `adafactorlean` (the same update
without parameter-sized temporaries, jetmoe_timm.optim), also with `step_in_backward=True`
(`adafactorlean-in-backward`: each weight updated and its gradient freed during backward).
Random init (no --pretrained): the weights' memory is the same.

    JETMOE_TIMM_SCRIPTS=DIR python scripts/train_memory.py [--models v_jetmoe_small c_jetmoe_tiny]
        [--optimizers adafactorlean adafactor adamw adamw-fused] [--batch-size 16] [--steps 3] [--amp]
        [--allocators launcher glibc] [--rounds 1] [--out FILE.json]

`--allocators launcher glibc` runs every configuration both ways, alternating: as the launcher runs CPU training
(glibc told to keep freed memory, `jetmoe_timm.tools._scripts.keep_freed_memory`), and with glibc's malloc as it is
(`JETMOE_TIMM_ALLOCATOR=default`).
"""
import argparse
import json
import re
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ALLOCATORS = {'launcher': {}, 'glibc': {'JETMOE_TIMM_ALLOCATOR': 'default'}}
# --opt and its kwargs per optimizer name
OPTIMIZERS = {'adafactorlean': ['--opt', 'adafactorlean'], 'adafactor': ['--opt', 'adafactor'],
              'adafactorlean-in-backward': ['--opt', 'adafactorlean', '--opt-kwargs', 'step_in_backward=True'],
              'adamw': ['--opt', 'adamw'], 'adamw-fused': ['--opt', 'adamw', '--opt-kwargs', 'fused=True']}


def synthetic_folder(root: Path, images: int, classes: int = 4) -> None:
    """A train split of random 64-px PNGs (train.py resizes them to the model's input size)."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / 'train' / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f'{i}.png')


def run_once(data: Path, model: str, optimizer: str, batch: int, amp: bool, scripts: str,
             allocator: str = 'launcher') -> dict:
    cmd = [sys.executable, '-m', 'jetmoe_timm.train', '--timm-scripts', scripts, str(data), '--model', model,
           '--num-classes', '4', '--device', 'cpu', '-b', str(batch), *OPTIMIZERS[optimizer], '--lr', '1e-4',
           '--warmup-epochs', '0', '--epochs', '1', '-j', '0', '--log-interval', '1', '--val-split', '',
           '--output', str(data / 'runs'), '--experiment', f'{model}-{optimizer}', '--checkpoint-hist', '1']
    if amp:
        cmd += ['--amp', '--amp-dtype', 'bfloat16']
    # the user's own malloc settings would silently turn the launcher's off: each candidate gets only its own
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('MALLOC_') and k not in ('JETMOE_TIMM_ALLOCATOR', 'LD_PRELOAD', 'GLIBC_TUNABLES')}
    env.update(ALLOCATORS[allocator])
    row = dict(model=model, optimizer=optimizer, batch=batch, amp=amp, allocator=allocator)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = '\n'.join(log.splitlines()[-15:])
        return dict(row, failed=proc.returncode, log_tail=tail)
    steps = [float(t) for t in re.findall(r'Time: (\d+\.\d+)s,', log)]
    return dict(row, peak_rss_gb=usage.ru_maxrss / 2 ** 20, seconds=seconds, step_s=steps,
                median_step_s=statistics.median(steps[1:] or steps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    ap.add_argument('--models', nargs='+', default=['v_jetmoe_small', 'c_jetmoe_tiny'])
    ap.add_argument('--optimizers', nargs='+', default=['adafactorlean'],
                    choices=list(OPTIMIZERS))
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--steps', type=int, default=3, help='training steps (the epoch of the synthetic folder)')
    ap.add_argument('--amp', action='store_true', help='bf16 autocast (train.py --amp --amp-dtype bfloat16)')
    ap.add_argument('--allocators', nargs='+', default=['launcher'], choices=list(ALLOCATORS))
    ap.add_argument('--rounds', type=int, default=1, help='runs of each configuration, alternating')
    ap.add_argument('--out', help='also write the rows as JSON here')
    args = ap.parse_args(argv)
    scripts = os.environ.get('JETMOE_TIMM_SCRIPTS')
    if not scripts or not Path(scripts, 'train.py').is_file():
        print('Set JETMOE_TIMM_SCRIPTS to a folder holding timm\'s train.py (docs/training.md, section 1).',
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        synthetic_folder(data, args.batch_size * args.steps)
        for r in range(args.rounds):
            for model in args.models:
                for optimizer in args.optimizers:
                    for allocator in args.allocators[::-1] if r % 2 else args.allocators:
                        row = run_once(data, model, optimizer, args.batch_size, args.amp, scripts, allocator)
                        rows.append(row)
                        what = (f"{model:20s} {optimizer:10s} batch {args.batch_size}{' bf16' if args.amp else ''} "
                                f"{allocator:8s}")
                        if 'failed' in row:
                            print(f"{what}: failed (rc {row['failed']})\n{row['log_tail']}")
                        else:
                            print(f"{what}: peak RSS {row['peak_rss_gb']:.2f} GB, step {row['median_step_s']:.2f} s "
                                  f"(median), {row['seconds']:.0f} s in all", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(command=' '.join(sys.argv), rows=rows), indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
