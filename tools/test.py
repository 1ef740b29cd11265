"""Test with the config's toolbox: ``python tools/test.py CONFIG CHECKPOINT [upstream test.py
arguments] [--metrics-json PATH]``. ``--metrics-json`` (mmreparam's own) also writes the
metrics as JSON."""
import sys

from mmreparam.checkpoint import CheckpointError
from mmreparam.cli import run_tool
from mmreparam.cli.toolbox import run_upstream_tool


def run(argv):
    """The tool's body: take ``--metrics-json`` off, run the toolbox's test.py."""
    metrics_json = None
    if '--metrics-json' in argv:
        i = argv.index('--metrics-json')
        if i + 1 >= len(argv):
            raise ValueError('--metrics-json needs a path')
        metrics_json = argv[i + 1]
        del argv[i:i + 2]
    run_upstream_tool('test.py', argv, metrics_json=metrics_json)


def main() -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv[:1] in (['-h'], ['--help']) else 2
    return run_tool('tools/test.py', run, argv,
                    errors=(FileNotFoundError, ValueError, CheckpointError))


if __name__ == '__main__':
    sys.exit(main())
