"""Re-parameterizable blocks and the fold math.

Every module of this package is imported here (the loop below), so that a block type in a
new module registers itself (``@MODELS.register_module()``) and is picked up by the factory,
``reparameterize``, the checkpoint converter and the regularizer with no other edit.
"""
import importlib
import pkgutil

from .base import Foldable, ReparamBlock, build_bn
from .branches import ACB, DBB, BNAndPad, ConvBN, QARepVGGBlock, RepVGGBlock
from .csla import CSLABlock, ScaleLayer
from .norm import SyncBatchNorm
from .orepa import OREPA, OREPA1x1, OREPAKernel, OREPALargeConv, OREPAVGGBlock
from .repmlp import ChannelGlobalPerceptron, PartitionGlobalPerceptron, RepMLPBlock
from .se import SEBlock, SELayer

__all__ = [
    'SyncBatchNorm',
    'ReparamBlock', 'build_bn', 'ConvBN', 'ACB', 'DBB', 'BNAndPad', 'RepVGGBlock',
    'QARepVGGBlock', 'SEBlock', 'SELayer', 'CSLABlock', 'ScaleLayer',
    'OREPA', 'OREPA1x1', 'OREPAKernel', 'OREPALargeConv', 'OREPAVGGBlock', 'Foldable',
    'RepMLPBlock', 'PartitionGlobalPerceptron', 'ChannelGlobalPerceptron'
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_module.name}')
