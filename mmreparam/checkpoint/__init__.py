"""Checkpoint loading: safe unpickling, and converting other layouts into mmreparam's."""
from ..errors import CheckpointError, UnsafeCheckpointError
from .convert import (
    CheckpointFormat,
    ConversionReport,
    convert_checkpoint,
    detect_format,
    load_pretrained,
    read_state_dict,
)
from .safe_load import register_safe_globals, safe_load

__all__ = [
    'CheckpointError', 'UnsafeCheckpointError', 'register_safe_globals', 'safe_load',
    'CheckpointFormat', 'ConversionReport', 'convert_checkpoint', 'detect_format',
    'load_pretrained', 'read_state_dict'
]
