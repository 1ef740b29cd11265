"""Training-time integration with mmengine (hooks)."""
from .hooks import FoldHook

__all__ = ['FoldHook']
