"""Train with the config's toolbox: ``python tools/train.py CONFIG [mmdet/mmseg/mmpretrain
train.py arguments]`` (e.g. ``--work-dir``, ``--resume``, ``--amp``, ``--cfg-options``)."""
import sys

from mmreparam.checkpoint import CheckpointError
from mmreparam.cli import run_tool
from mmreparam.cli.toolbox import run_upstream_tool


def main() -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__)
        return 0 if len(sys.argv) >= 2 else 2
    return run_tool('tools/train.py', run_upstream_tool, 'train.py', sys.argv[1:],
                    errors=(FileNotFoundError, ValueError, CheckpointError))


if __name__ == '__main__':
    sys.exit(main())
