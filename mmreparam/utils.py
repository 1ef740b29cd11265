"""Small shared helpers and type aliases."""
import ast
import contextlib
from typing import Any, Callable, Optional, Tuple, Type, Union

import torch
from mmengine.config import ConfigDict

ConfigType = Union[dict, ConfigDict]
OptConfigType = Optional[ConfigType]


def autocast_off(device_type: str):
    """A context that turns autocast off on ``device_type`` (kernels are generated and folded
    in the parameters' precision); a no-op where autocast does not exist (e.g. ``meta``)."""
    available = getattr(torch.amp, 'is_autocast_available', None)  # torch >= 2.4
    if available(device_type) if available else device_type in ('cpu', 'cuda'):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def pretrained_init(init_cfg: Any) -> Optional[dict]:
    """The ``dict(type='Pretrained', ...)`` of an mmengine ``init_cfg`` (a dict, or a list
    of them, as mmengine accepts), else None."""
    for cfg in init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]:
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            return cfg
    return None


def without_pretrained(init_cfg: Any) -> Any:
    """``init_cfg`` without its ``Pretrained`` entry: None for a lone Pretrained dict, the
    other entries of a list (None when none is left), anything else unchanged."""
    found = pretrained_init(init_cfg)
    if found is None:
        return init_cfg
    if isinstance(init_cfg, (list, tuple)):
        rest = [c for c in init_cfg if c is not found]
        return rest or None
    return None


def describe_error(err: BaseException) -> str:
    """``'Type: first line of the message'`` (or the type alone): an error in one line."""
    lines = str(err).strip().splitlines()
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


def run_cli(fn: Callable[..., Any], *args,
            errors: Tuple[Type[BaseException], ...] = (OSError, ValueError, TypeError)
            ) -> Optional[str]:
    """Run a command-line tool's body; turn an expected error into one line for the user.

    Bad input to a tool is reported, not dumped: the tool prints the returned
    ``error: <first line of the message>`` on stderr (no traceback) and exits with 1.

    Args:
        fn (callable): The tool's body, called as ``fn(*args)``.
        errors (tuple[type]): The exception types that mean bad input.

    Returns:
        str | None: None on success, else the ``error: ...`` line.
    """
    try:
        fn(*args)
    except errors as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f'error: {message}'
    return None


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


__all__ = ['ConfigType', 'OptConfigType', 'pretrained_init', 'without_pretrained',
           'describe_error', 'run_cli', 'parse_key_values']
