"""Train with the config's toolbox: ``python tools/train.py CONFIG [mmdet/mmseg/mmpretrain
train.py arguments]`` (e.g. ``--work-dir``, ``--resume``, ``--amp``, ``--cfg-options``)."""
import sys

from mmreparam.apis.toolbox import run_upstream_tool
from mmreparam.checkpoint import CheckpointError


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    try:
        run_upstream_tool('train.py', sys.argv[1:])
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        sys.exit(f'tools/train.py: error: {err}')


if __name__ == '__main__':
    main()
