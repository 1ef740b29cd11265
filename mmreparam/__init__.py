"""mmreparam: structural re-parameterization for OpenMMLab.

Importing the package registers its modules in the ``mmreparam`` registry scope and lets
mmengine's own checkpoints reload under ``torch.load(weights_only=True)`` (see
:mod:`mmreparam.checkpoint.safe_load`); mmengine's ``CheckpointLoader`` then reads files,
URLs and model-zoo names with that safe loader (:mod:`mmreparam.checkpoint.reading`).
"""
try:
    import mmcv.cnn  # noqa: F401  (the blocks build their layers with it)
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'mmreparam needs mmcv >= 2.0 (mmcv.cnn), which pip does not install for it: install '
        'the mmcv wheel for your torch as OpenMMLab describes (e.g. `mim install mmcv`), or '
        f'mmcv-lite ({err})') from err

from .checkpoint import register_safe_globals, register_safe_loaders  # noqa: E402
from .version import __version__  # noqa: E402

register_safe_globals()
register_safe_loaders()

from . import models  # noqa: E402,F401  (registers the blocks)
from .apis import fold, fold_error, reparameterize, upstream_config  # noqa: E402
from .apis.expand import expand  # noqa: E402
from .engine import FoldHook, RepOptimizerConstructor  # noqa: E402
from .models import RepMLPResNet, RepOptVGG, RepVGG, ResNet  # noqa: E402
from .registry import HOOKS, MODELS  # noqa: E402

__all__ = ['__version__', 'fold', 'expand', 'fold_error', 'reparameterize', 'upstream_config',
           'FoldHook', 'RepOptimizerConstructor', 'ResNet', 'RepVGG', 'RepMLPResNet',
           'RepOptVGG', 'MODELS', 'HOOKS']
