"""Other libraries' fold methods: how each is called and how to tell it has been done.

mmpretrain, mmyolo and timm fold their blocks with methods of their own, under a handful of
names. :data:`FOREIGN_FOLDS` lists them, in the order they are looked for, and
:func:`foreign_deploy_state` reads the markers by which their modules say that they are in
deploy form (built that way or already folded), so that :func:`~.base.fold_module` does not
call a method again on a module it has folded (many are not idempotent) and leaves a
deploy-form model as it is. A module without any marker is folded each time it is met.

Surveyed: mmpretrain 1.2.0 (RepVGG, MobileOne, RepLKNet, RepMLPNet, RIFormer, LeViT,
TinyViT), timm 1.0.31 (byobnet RepVGG / MobileOne, FastViT, GhostNetV3, RepGhostNet,
LCNetV2, NextViT, RepViT, LeViT, EfficientViT-MSRA, TinyViT, SHViT, iFormer, EfficientViM);
mmdet 3.3.0, mmseg 1.2.2 and mmcv 2.1.0 have none (mmdet's FPG neck has a ``fuse(fuse_dict)``
that is no fold: a method that needs arguments is never called). mmyolo (not installed here)
is known by its ``switch_to_deploy``. Model-level conveniences (timm's ``convert_to_deploy``)
are not called: walking the model folds the same modules.
"""
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class ForeignFold:
    """One foreign fold method.

    Attributes:
        method (str): The method's name; it is called without arguments.
        replaces (bool): The method returns the module that takes the caller's place in its
            parent (timm's ``fuse()``, as ``timm.utils.reparameterize_model`` uses it; a
            method that returns the module itself folded it in place). False: it folds the
            module in place and its return value is ignored.
        seen_in (str): Where it is found (documentation only).
    """
    method: str
    replaces: bool
    seen_in: str


#: The foreign fold methods, in the order they are looked for: a module is folded with the
#: first one it has. ``switch_to_deploy`` comes before ``reparameterize`` because
#: mmpretrain's RepVGGBlock / MobileOneBlock have both and their ``reparameterize()`` only
#: returns the fused kernel and bias.
FOREIGN_FOLDS: Tuple[ForeignFold, ...] = (
    ForeignFold('switch_to_deploy', False,
                'mmpretrain RepVGG / MobileOne / RIFormer blocks and backbones, LeViT '
                'backbone and head, RepLKNet and RepMLPNet backbones; mmyolo; '
                'timm GhostNetV3, RepGhost modules'),
    ForeignFold('reparameterize', False,
                'timm byobnet RepVggBlock / MobileOneBlock, FastViT (MobileOneBlock, '
                'ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc), LCNetV2, NextViT'),
    ForeignFold('merge_kernel', False, 'mmpretrain RepLKNet ReparamLargeKernelConv'),
    ForeignFold('local_inject', False, 'mmpretrain RepMLPNet RepMLPBlock'),
    ForeignFold('fuse', True,
                'timm RepViT, LeViT, EfficientViT-MSRA, TinyViT, SHViT, iFormer, EfficientViM '
                '(conv/linear + BN pairs, residual depthwise convs); mmpretrain LeViT and '
                'TinyViT conv/linear + BN pairs'),
)

#: Boolean attributes that say "in deploy form" when True: mmpretrain / mmyolo ``deploy``,
#: timm FastViT ``inference_mode``, GhostNetV3 ``infer_mode``, NextViT ``is_fused``,
#: EfficientViM ``fused``, mmpretrain ReparamLargeKernelConv ``small_kernel_merged``.
DEPLOY_FLAGS = ('deploy', 'inference_mode', 'infer_mode', 'is_fused', 'fused',
                'small_kernel_merged')


def _reparam_conv(module: nn.Module) -> Optional[bool]:
    # timm byobnet / FastViT: ``reparam_conv`` is None until folded (FastViT's RepMixer and
    # ReparamLargeKernelConv set no flag when they fold: this is their only marker).
    if 'reparam_conv' in module._modules or 'reparam_conv' in vars(module):
        return getattr(module, 'reparam_conv') is not None
    return None


def _lcnetv2_branches(module: nn.Module) -> Optional[bool]:
    # timm LCNetV2 RepDepthwiseSeparable: its branch list becomes None when folded.
    if 'dw_conv_list' in module._modules or 'dw_conv_list' in vars(module):
        return getattr(module, 'dw_conv_list') is None
    return None


def _repghost_fusion(module: nn.Module) -> Optional[bool]:
    # timm RepGhostModule: its fusion_conv / fusion_bn lists are emptied when folded.
    lists = [module._modules.get(name) for name in ('fusion_conv', 'fusion_bn')]
    if all(isinstance(item, (nn.ModuleList, nn.Sequential)) for item in lists):
        return all(len(item) == 0 for item in lists)
    return None


#: Markers other than :data:`DEPLOY_FLAGS`: each returns True (deploy form), False (train
#: form) or None (the module does not have this marker).
DEPLOY_MARKERS: Tuple[Callable[[nn.Module], Optional[bool]], ...] = (
    _reparam_conv, _lcnetv2_branches, _repghost_fusion)


def foreign_deploy_state(module: nn.Module) -> Optional[bool]:
    """Whether a foreign module is in deploy form, by its own markers.

    Args:
        module (nn.Module): A module of another library.

    Returns:
        bool or None: True when one of its markers says it is folded (or built in deploy
        form), False when it has markers and none says so, None when it has no marker.
    """
    states = [value for name, value in vars(module).items()
              if name in DEPLOY_FLAGS and isinstance(value, bool)]
    states += [state for state in (marker(module) for marker in DEPLOY_MARKERS)
               if state is not None]
    if not states:
        return None
    return any(states)


def _callable_without_arguments(fn) -> bool:
    """Whether ``fn`` is a bound method that can be called with no argument."""
    if not inspect.ismethod(fn):
        return False
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def foreign_fold_of(module: nn.Module) -> Optional[ForeignFold]:
    """The entry of :data:`FOREIGN_FOLDS` that folds ``module``: the first method it has
    as a bound method callable without arguments (a submodule or attribute of the same
    name does not count); None when it has none."""
    for entry in FOREIGN_FOLDS:
        if _callable_without_arguments(getattr(module, entry.method, None)):
            return entry
    return None


def foreign_fold_problem(module: nn.Module) -> Optional[str]:
    """Why folding ``module`` with its own library's method would change its function; None
    when nothing is known against it.

    Known: mmpretrain (1.2.0)'s ``RepVGGBlock`` with an SE layer. Its deploy-mode forward
    returns ``branch_reparam(x)`` before the SE layer, so ``switch_to_deploy()`` drops the SE
    from the function (measured: relative error about 30 on a D2se block).
    """
    cls = type(module)
    if cls.__module__.startswith('mmpretrain.') and cls.__name__ == 'RepVGGBlock' \
            and getattr(module, 'se_cfg', None) is not None and not module.deploy:
        return (f'{cls.__module__}.RepVGGBlock with se_cfg cannot be folded: its deploy form '
                'skips the SE layer (mmpretrain returns branch_reparam(x) before it), so its '
                'outputs would change. Build mmreparam.RepVGG with the same arch and se_cfg '
                'instead: mmpretrain checkpoints load into it, and its fold keeps the SE')
    return None


__all__ = ['DEPLOY_FLAGS', 'DEPLOY_MARKERS', 'FOREIGN_FOLDS', 'ForeignFold',
           'foreign_deploy_state', 'foreign_fold_of', 'foreign_fold_problem']
