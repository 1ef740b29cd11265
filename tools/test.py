"""Test with the config's toolbox: ``python tools/test.py CONFIG CHECKPOINT [upstream test.py
arguments] [--metrics-json PATH]``. ``--metrics-json`` (mmreparam's own) also writes the
metrics as JSON."""
import sys

from mmreparam.apis.toolbox import run_upstream_tool
from mmreparam.checkpoint import CheckpointError


def main():
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] in ('-h', '--help'):
        print(__doc__)
        sys.exit(0 if argv[:1] in (['-h'], ['--help']) else 2)
    metrics_json = None
    if '--metrics-json' in argv:
        i = argv.index('--metrics-json')
        if i + 1 >= len(argv):
            sys.exit('tools/test.py: error: --metrics-json needs a path')
        metrics_json = argv[i + 1]
        del argv[i:i + 2]
    try:
        run_upstream_tool('test.py', argv, metrics_json=metrics_json)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        sys.exit(f'tools/test.py: error: {err}')


if __name__ == '__main__':
    main()
