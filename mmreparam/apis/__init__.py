"""Public functions: :func:`fold` and :func:`fold_error`."""
from .fold import fold, fold_error

__all__ = ['fold', 'fold_error']
