"""Re-parameterizable blocks and the fold math."""
from .base import Foldable, ReparamBlock, build_bn
from .branches import ACB, DBB, BNAndPad, ConvBN, QARepVGGBlock, RepVGGBlock, SEBlock
from .norm import SyncBatchNorm
from .orepa import OREPA, OREPA1x1, OREPAKernel, OREPALargeConv, OREPAVGGBlock
from .repmlp import ChannelGlobalPerceptron, PartitionGlobalPerceptron, RepMLPBlock

__all__ = [
    'SyncBatchNorm',
    'ReparamBlock', 'build_bn', 'ConvBN', 'ACB', 'DBB', 'BNAndPad', 'RepVGGBlock',
    'QARepVGGBlock', 'SEBlock',
    'OREPA', 'OREPA1x1', 'OREPAKernel', 'OREPALargeConv', 'OREPAVGGBlock', 'Foldable',
    'RepMLPBlock', 'PartitionGlobalPerceptron', 'ChannelGlobalPerceptron'
]
