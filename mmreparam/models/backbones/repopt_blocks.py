"""RepOpt-VGG's target block; its CSLA block and the two rules live in
:mod:`mmreparam.models.layers.csla` (re-exported here, their former place)."""
from ..layers import ConvBN
from ..layers.csla import (
    SCALE_KEYS,
    CSLABlock,
    ScaleLayer,
    has_identity_branch,
    init_plain_kernel,
    repopt_grad_mult,
    repopt_kernel,
)


def plain_block(*args, use_se: bool = False, **kwargs) -> ConvBN:
    """RepOpt-VGG's target block, ``conv -> BN -> act`` (the official ``RealVGGBlock``).

    Takes :class:`RepVGG`'s block arguments; ``use_se`` is always False (RepOpt-VGG arches
    have no SE) and is not passed on.
    """
    return ConvBN(*args, **kwargs)


__all__ = ['SCALE_KEYS', 'has_identity_branch', 'repopt_kernel', 'repopt_grad_mult',
           'init_plain_kernel', 'ScaleLayer', 'CSLABlock', 'plain_block']
