"""Re-parameterize upstream OpenMMLab backbones: ``python tools/reparam_table.py [--out FILE]``.

For each backbone (built through its toolbox's registry at its usual width) and each block
type, :func:`mmreparam.reparameterize` and :func:`mmreparam.fold` are run and measured
(:mod:`mmreparam.benchmark.reparam_table` says how each column is measured).

The table goes to stdout and, with ``--out``, to a Markdown file (rewritten atomically after
each row).
``--backbones`` and ``--reparams`` choose rows; ``--size`` is the input size.
"""
import argparse
import shlex
import sys

import torch

from mmreparam.benchmark.reparam_table import BACKBONES, HEADER, REPARAMS, format_row, measure
from mmreparam.fileio import atomic_write
from mmreparam.models.layers.factory import REPARAM_TYPES


def parse_args(argv=None):
    """The command line; bad names and sizes are refused here, before any row is measured
    (a row that fails is a table entry, so a typo would otherwise fill a table of failures)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES),
                        help=f'rows (default: all): {list(BACKBONES)}')
    parser.add_argument('--reparams', nargs='+', default=list(REPARAMS),
                        choices=list(REPARAM_TYPES), metavar='REPARAM',
                        help=f'block types, of {", ".join(REPARAM_TYPES)} (default: '
                        f'{" ".join(REPARAMS)})')
    parser.add_argument('--size', type=int, default=64, help='input size (default 64)')
    parser.add_argument('--steps', type=int, default=5,
                        help='timed training steps of each model (default 5)')
    parser.add_argument('--out', help='write the Markdown table here as well')
    args = parser.parse_args(argv)
    unknown = [name for name in args.backbones if name not in BACKBONES]
    if unknown:
        parser.error(f'unknown backbone(s) {unknown}; choose from {list(BACKBONES)}')
    for name in ('size', 'steps'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be a positive int, got {getattr(args, name)}')
    return args


def write_table(path, lines, args, argv):
    """Write the table so far (atomically: a reader sees the old or the new file)."""
    command = shlex.join(['python', 'tools/reparam_table.py', *argv])
    text = (f'CPU ({torch.get_num_threads()} thread(s)), input {args.size}x{args.size}, '
            f'batch 2, torch {torch.__version__}: `{command}`\n\n'
            + '\n'.join(lines) + '\n')

    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)

    atomic_write(path, write)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    lines = [HEADER]
    print(HEADER, flush=True)
    for name in args.backbones:
        for reparam in args.reparams:
            try:
                row = measure(BACKBONES[name], reparam, args.size, args.steps)
            except Exception as err:  # noqa: BLE001 - one failing row is a table entry
                row = dict(error=f'{type(err).__name__}: {str(err)[:200]}')
            lines.append(format_row(name, reparam, row))
            print(lines[-1], flush=True)
            if args.out:  # after each row: a long run leaves what it measured
                write_table(args.out, lines, args, argv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
