"""``python -m mmreparam.cli.precheck TOOL [tool arguments]``: the checks ``tools/<TOOL>``
makes on its arguments before it starts (:func:`~mmreparam.cli.toolbox.check_tool_arguments`),
run once by ``tools/dist_run.sh`` before torchrun starts the processes.

Bad input is then one ``tools/<TOOL>: error: ...`` line and exit status 1, instead of the
same line from every process followed by torchrun's traceback of the failed children.
"""
import sys
from typing import List, Optional

from ..checkpoint import CheckpointError
from . import run_tool
from .toolbox import check_tool_arguments


def main(argv: Optional[List[str]] = None) -> int:
    """Check ``TOOL``'s arguments; return the exit status (1 with one error line)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print('usage: python -m mmreparam.cli.precheck TOOL [tool arguments]', file=sys.stderr)
        return 2
    tool, *args = argv
    return run_tool(f'tools/{tool}', check_tool_arguments, tool, args,
                    errors=(FileNotFoundError, ValueError, CheckpointError))


if __name__ == '__main__':
    sys.exit(main())
