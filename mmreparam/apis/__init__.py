"""Public functions: :func:`fold`, :func:`fold_error` and the deploy artifacts."""
from .deploy import deploy_config, export_deploy
from .fold import fold, fold_error, fold_error_on_batch

__all__ = ['fold', 'fold_error', 'fold_error_on_batch', 'deploy_config', 'export_deploy']
