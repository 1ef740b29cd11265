"""Public functions: :func:`fold`, :func:`fold_error`, the deploy artifacts and
:func:`quantize_int8`."""
from .deploy import deploy_config, export_deploy
from .fold import fold, fold_error, fold_error_on_batch
from .quantize import quantize_int8

__all__ = ['fold', 'fold_error', 'fold_error_on_batch', 'deploy_config', 'export_deploy',
           'quantize_int8']
