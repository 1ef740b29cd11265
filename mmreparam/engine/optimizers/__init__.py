"""Optimizers: the RepOptimizer (gradient re-parameterization) and its mmengine constructor."""
from .repoptimizer import RepOptimizerConstructor, RepOptSGD, collect_grad_mults

__all__ = ['RepOptimizerConstructor', 'RepOptSGD', 'collect_grad_mults']
