"""Registries of mmreparam.

Each registry is a child of the corresponding mmengine root registry and carries
``locations``, so that ``type='mmreparam.ResNet'`` resolves from an mmdet, mmseg or
mmpretrain config without ``custom_imports``: mmengine imports ``mmreparam.registry`` when it
meets the ``mmreparam`` scope, and the ``locations`` are imported lazily on the first lookup.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mmreparam',
                  locations=['mmreparam.models', 'mmreparam.apis.reparameterize'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mmreparam',
                 locations=['mmreparam.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optimizer wrapper constructor',
                                      parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
                                      scope='mmreparam', locations=['mmreparam.engine'])

__all__ = ['MODELS', 'HOOKS', 'OPTIM_WRAPPER_CONSTRUCTORS']
