"""Benchmarks (``make bench``): training cost, deploy speed and fold exactness.

The sections and what each measures: :mod:`mmreparam.benchmark`. Writes ``OUT/benchmark.md``
(tables) and ``OUT/benchmark.png`` (time and memory per block type) and logs progress while
it runs. Example::

    python tools/benchmark.py --out work_dirs/bench                 # everything
    python tools/benchmark.py --only train --workloads small --repeats 3
"""
import argparse
import os
import sys
import time

import torch

from mmreparam import benchmark as bench
from mmreparam.fileio import atomic_write
from mmreparam.models.layers.factory import REPARAM_TYPES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='work_dirs/bench',
                        help='folder for benchmark.md and benchmark.png (default: %(default)s)')
    parser.add_argument('--only', nargs='+', choices=list(bench.SECTIONS),
                        default=list(bench.SECTIONS), metavar='SECTION',
                        help=f'sections to run, of {", ".join(bench.SECTIONS)} (default: all)')
    parser.add_argument('--reparams', nargs='+', choices=list(REPARAM_TYPES),
                        default=list(REPARAM_TYPES), metavar='REPARAM',
                        help='ResNet-50 block types of the training sections, of '
                        f'{", ".join(REPARAM_TYPES)} (default: all; base is always measured)')
    parser.add_argument('--workloads', nargs='+', choices=list(bench.WORKLOADS),
                        default=list(bench.WORKLOADS), metavar='WORKLOAD',
                        help='training workloads, of ' + ', '.join(
                            f'{name} (batch {b} at {s})'
                            for name, (b, s) in bench.WORKLOADS.items()) + ' (default: all)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed runs of each measurement (default: %(default)s)')
    parser.add_argument('--rounds', type=int, default=2,
                        help='rounds of fresh subprocesses per training configuration '
                        '(default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed runs before the timed ones (default: %(default)s)')
    parser.add_argument('--infer-shape', type=int, nargs=2, default=(8, 224),
                        metavar=('BATCH', 'SIZE'),
                        help='batch and image side of the inference section (default: 8 224)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu or cuda (default: cuda when torch sees a GPU, else cpu)')
    parser.add_argument('--amp', choices=('bf16', ), default=None,
                        help='train section: run the forward pass under bfloat16 autocast')
    return parser.parse_args(argv)


def write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)


def main(argv=None):
    """Measure, write ``benchmark.md`` (and ``benchmark.png`` with the train section)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        settings = bench.BenchmarkSettings(
            device=args.device, reparams=args.reparams, workloads=args.workloads,
            repeats=args.repeats, rounds=args.rounds, warmup=args.warmup,
            infer_shape=tuple(args.infer_shape), amp=args.amp, config_dir=CONFIG_DIR)
    except ValueError as e:  # before anything is measured or written
        sys.exit(f'tools/benchmark.py: error: {e}')
    start = time.time()
    reports = bench.run_benchmark(settings, args.only)
    text = bench.benchmark_markdown(reports, settings, time.time() - start,
                                    f'python tools/benchmark.py {" ".join(argv)}')
    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, 'benchmark.md')]
    atomic_write(written[0], lambda tmp: write_text(tmp, text + '\n'))
    if 'train' in reports:
        written.append(os.path.join(args.out, 'benchmark.png'))
        atomic_write(written[1], lambda tmp: bench.plot_training_cost(reports['train'].data,
                                                                      tmp))
    print('\n' + text)
    print(f'wrote {" and ".join(written)}')


if __name__ == '__main__':
    main()
