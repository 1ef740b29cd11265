"""mmengine hooks."""
from .fold_hook import FoldHook

__all__ = ['FoldHook']
