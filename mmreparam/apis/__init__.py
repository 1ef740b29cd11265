"""Public functions: :func:`fold`, :func:`fold_error`, the deploy artifacts,
:func:`quantize_int8` and :func:`reparameterize` (any CNN's conv -> BN pairs into re-param
blocks)."""
from .deploy import deploy_config, export_deploy
from .fold import fold, fold_error, fold_error_on_batch
from .pairs import ConvBNPair, find_conv_bn_pairs
from .quantize import quantize_int8
from .reparameterize import ReparamReport, reparameterize, upstream_config
from .upstream import restore_upstream

__all__ = ['fold', 'fold_error', 'fold_error_on_batch', 'deploy_config', 'export_deploy',
           'quantize_int8', 'reparameterize', 'ReparamReport', 'upstream_config',
           'find_conv_bn_pairs', 'ConvBNPair', 'restore_upstream']
