"""Optimizers: the RepOptimizer (gradient re-parameterization), its mmengine constructor,
and its scales files."""
from .repopt_scales_io import SCALES_FORMAT, load_scales, save_scales
from .repoptimizer import RepOptimizerConstructor, RepOptSGD, collect_grad_mults

__all__ = ['RepOptimizerConstructor', 'RepOptSGD', 'collect_grad_mults', 'SCALES_FORMAT',
           'load_scales', 'save_scales']
