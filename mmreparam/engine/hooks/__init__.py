"""mmengine hooks."""
from .fold_hook import FoldHook
from .tool_hooks import FoldCheckWarningHook, MetricsJsonHook

__all__ = ['FoldHook', 'FoldCheckWarningHook', 'MetricsJsonHook']
