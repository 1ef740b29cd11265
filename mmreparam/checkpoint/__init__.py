"""Checkpoint loading: safe unpickling (and, later, official-format key mapping)."""
from .safe_load import (CheckpointError, UnsafeCheckpointError, register_safe_globals,
                        safe_load)

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'register_safe_globals', 'safe_load']
