"""Public functions: :func:`fold`, :func:`fold_error`, the deploy artifacts (mmreparam's form
and the upstream model's, :func:`upstream_deploy`) and :func:`quantize_int8`."""
from .deploy import deploy_config, export_deploy
from .fold import fold, fold_error, fold_error_on_batch
from .quantize import quantize_int8
from .upstream import UpstreamDeploy, upstream_deploy

__all__ = ['fold', 'fold_error', 'fold_error_on_batch', 'deploy_config', 'export_deploy',
           'quantize_int8', 'upstream_deploy', 'UpstreamDeploy']
