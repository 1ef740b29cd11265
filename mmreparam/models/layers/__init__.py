"""Re-parameterizable blocks and the fold math."""
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
