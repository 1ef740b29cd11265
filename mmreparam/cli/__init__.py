"""The command-line plumbing of ``tools/``: one error path for every tool, building a
config's model, running the upstream toolbox scripts (:mod:`.toolbox`).

Library code does not import this package; the public API is :mod:`mmreparam.apis`.
"""
import ast
import sys
from typing import Any, Callable, Optional, Tuple, Type

__all__ = ['run_tool', 'parse_key_values']


def run_tool(prog: Optional[str], fn: Callable[..., Any], *args,
             errors: Tuple[Type[BaseException], ...] = (OSError, ValueError, TypeError)
             ) -> int:
    """Run a command-line tool's body; report an expected error in one line.

    Bad input to a tool is reported, not dumped: ``<prog>: error: <first line of the
    message>`` (``error: ...`` when ``prog`` is None) goes to stderr, with no traceback, and
    the exit status is 1. Other exceptions (bugs) propagate with their traceback.

    Args:
        prog (str, optional): The tool's name in the message, e.g. ``'tools/fold.py'``.
        fn (callable): The tool's body, called as ``fn(*args)``.
        errors (tuple[type]): The exception types that mean bad input.

    Returns:
        int: The exit status, 0 or 1.
    """
    try:
        fn(*args)
    except errors as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f'{prog}: error: {message}' if prog else f'error: {message}', file=sys.stderr)
        return 1
    return 0


def parse_key_values(items, option: str = '--set') -> dict:
    """``['base_channels=32', 'style=caffe']`` -> ``{'base_channels': 32, 'style': 'caffe'}``.

    Values are Python literals where they parse as one, else strings.

    Raises:
        ValueError: An item is not ``KEY=VALUE`` (the message names ``option``).
    """
    values = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ValueError(f'{option} expects KEY=VALUE, got {item!r}')
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    return values
