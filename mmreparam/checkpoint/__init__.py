"""Checkpoint loading: safe unpickling, and converting other layouts into mmreparam's.

- :mod:`.safe_load`: the allow-list unpickler every load goes through;
- :mod:`.reading`: a checkpoint's tensors (unwrapped, prefix stripped);
- :mod:`.formats`: which layout a state_dict has;
- :mod:`.layouts`: the foreign layouts renamed to mmreparam's keys;
- :mod:`.convert`: block-by-block conversion into a model, and its report.
"""
from ..errors import CheckpointError, UnsafeCheckpointError
from .convert import ConversionReport, convert_checkpoint, load_pretrained
from .formats import CheckpointFormat, detect_format
from .reading import read_checkpoint, read_state_dict, register_safe_loaders
from .safe_load import register_safe_globals, safe_load

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'register_safe_globals', 'safe_load',
    'CheckpointFormat', 'ConversionReport', 'convert_checkpoint', 'detect_format',
    'load_pretrained', 'read_checkpoint', 'read_state_dict', 'register_safe_loaders'
]
