"""Public functions: :func:`fold`, :func:`fold_error`, the deploy artifacts (mmreparam's form
and the upstream model's, :func:`upstream_deploy`), :func:`quantize_int8` and
:func:`reparameterize` (any CNN's conv -> BN pairs into re-param blocks)."""
from .deploy import deploy_config, export_deploy
from .fold import fold
from .fold_check import fold_error, fold_error_on_batch
from .fuse_pairs import build_fused_bn  # noqa: F401 - registers mmreparam.FusedBN
from .pairs import ConvBNPair, find_conv_bn_pairs
from .quantize import quantize_int8
from .reparameterize import ReparamReport, reparameterize, upstream_config
from .surgery import restore_upstream
from .upstream import UpstreamDeploy, upstream_deploy

__all__ = ['fold', 'fold_error', 'fold_error_on_batch', 'deploy_config', 'export_deploy',
           'quantize_int8', 'upstream_deploy', 'UpstreamDeploy', 'reparameterize',
           'ReparamReport', 'upstream_config', 'find_conv_bn_pairs', 'ConvBNPair',
           'restore_upstream']
