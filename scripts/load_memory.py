""" pretrained=True from a converted folder: timm's own load against the mapped load, side by side.

Each candidate runs in 3 fresh processes, alternating; reported: seconds, peak RSS above the process after its
imports, anonymous memory after the load. timm's load (random init, then a copy of the mapped state dict) is
forced by disabling the mapped path (``models._pretrained._mappable_weights``).

    python scripts/load_memory.py FOLDER        # e.g. the --out of `jetmoe-timm convert`
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, time
def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
import timm, jetmoe_timm
import jetmoe_timm.models._pretrained as pretrained
if sys.argv[2] == 'timm':
    pretrained._mappable_weights = lambda variant, kwargs: None
base, anon = status('VmRSS'), status('RssAnon')
t0 = time.perf_counter()
model = timm.create_model('local-dir:' + sys.argv[1], pretrained=True)  # kept: its memory counts
print(json.dumps(dict(seconds=time.perf_counter() - t0, above_gb=(status('VmHWM') - base) / 2 ** 30,
                      anon_gb=(status('RssAnon') - anon) / 2 ** 30)))
'''


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0].strip())
    parser.add_argument('folder', help='a converted model folder (the --out of `jetmoe-timm convert`)')
    folder = parser.parse_args(argv).folder
    if not (Path(folder) / 'model.safetensors').is_file():
        parser.error(f'{folder} holds no model.safetensors: give the --out folder of `jetmoe-timm convert`')
    rows = {'timm': [], 'mapped': []}
    for r in range(3):
        for how in ('timm', 'mapped') if r % 2 == 0 else ('mapped', 'timm'):
            out = subprocess.run([sys.executable, '-c', CHILD, folder, how], capture_output=True, text=True,
                                 check=True)
            rows[how].append(json.loads(out.stdout.strip().splitlines()[-1]))
    for how, runs in rows.items():
        med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
        print(f'{how:7s} {med}  seconds: {[round(r["seconds"], 2) for r in runs]}')


if __name__ == '__main__':
    main()
