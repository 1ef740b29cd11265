"""Small shared helpers and type aliases."""
import contextlib
from typing import Any, Optional, Union

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


__all__ = ['ConfigType', 'OptConfigType', 'pretrained_init', 'without_pretrained',
           'describe_error', 'autocast_off']
