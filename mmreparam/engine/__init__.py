"""Training-time integration with mmengine (hooks, optimizer wrapper constructors)."""
from .hooks import FoldHook
from .optimizers import RepOptimizerConstructor, RepOptSGD

__all__ = ['FoldHook', 'RepOptimizerConstructor', 'RepOptSGD']
