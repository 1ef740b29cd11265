"""RepMLP (Ding et al., "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers
for Image Recognition", arXiv 2105.01883): an FC block whose local perceptron (parallel
conv-BN branches) is merged into the partition FC at fold time ("Locality Injection").

Layout and parameter names follow the official ``RepMLP`` (DingXiaoH/RepMLP ``repmlp.py``):
``fc3`` / ``fc3_bn`` (partition perceptron) and ``repconv{k}.conv`` / ``repconv{k}.bn`` (local
perceptron); the global perceptron lives in ``gp``.
"""
from functools import partial
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from .base import Foldable, build_bn, replace_branches
from .branches import ConvBNBranch
from .fuse import conv_to_fc, fuse_bn, fuse_preceding_bn, pad_kernel

Size2 = Union[int, Tuple[int, int]]

#: The values of ``global_perceptron=`` (besides None).
GLOBAL_PERCEPTRONS = ('partition', 'channel')


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _size2(value: Size2, name: str, owner: str) -> Tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of positive ints, else a ValueError naming ``name``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(_positive_int(v) for v in pair):
        raise ValueError(f'{owner}: {name} must be a positive int or a pair of them, '
                         f'got {value!r}')
    return pair


class PartitionGlobalPerceptron(nn.Module, Foldable):
    """RepMLP's global perceptron (arXiv 2105.01883, Sec. 3.2).

    The mean of every ``h x w`` partition of every channel goes through a BatchNorm and a
    two-layer MLP (``fc1 -> ReLU -> fc2``) over all ``C * hp * wp`` means at once, so each
    output sees every partition; the block adds the result (one value per channel and
    partition) to every pixel of that partition. The MLP fixes the number of partitions
    ``(hp, wp)``, hence the input size. :meth:`fold` absorbs the BN into ``fc1``.

    Args:
        channels (int): Input channels ``C``.
        num_partitions (tuple[int, int]): ``(hp, wp)``, partitions per column and row.
        partition_size (tuple[int, int]): ``(h, w)`` of a partition.
        reduction (int): ``fc1`` has ``C * hp * wp // reduction`` outputs. Defaults to 1.
        norm_cfg (dict): BatchNorm config. Defaults to ``dict(type='BN')``.
        deploy (bool): Build the folded structure (no BN). Defaults to False.
    """

    def __init__(self, channels: int, num_partitions: Tuple[int, int],
                 partition_size: Tuple[int, int], reduction: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'), deploy: bool = False):
        super().__init__()
        features = channels * num_partitions[0] * num_partitions[1]
        if not _positive_int(reduction) or features // reduction < 1:
            raise ValueError(f'global perceptron: reduction must be a positive int of at most '
                             f'{features} (channels x partitions), got {reduction!r}')
        self.channels = channels
        self.num_partitions = tuple(num_partitions)
        self.partition_size = tuple(partition_size)
        self.bn = None if deploy else build_bn(norm_cfg, channels)
        self.fc1 = nn.Linear(features, features // reduction)
        self.fc2 = nn.Linear(features // reduction, features)

    @property
    def folded(self) -> bool:
        """Whether the BN is folded into ``fc1``."""
        return self.bn is None

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C, hp * h, wp * w)`` to the ``(N, C, hp, wp)`` values to add."""
        means = F.avg_pool2d(x, self.partition_size)
        if self.bn is not None:
            means = self.bn(means)
        out = self.fc2(F.relu(self.fc1(means.flatten(1))))
        return out.reshape(means.shape)

    def get_equivalent_fc1(self) -> Tuple[Tensor, Tensor]:
        """Weight and bias of ``fc1`` with the preceding BN (eval mode) folded in.

        Differentiable in every parameter involved.
        """
        if self.bn is None:
            return self.fc1.weight, self.fc1.bias
        return fuse_preceding_bn(self.fc1.weight, self.fc1.bias, self.bn)

    def fold(self) -> 'PartitionGlobalPerceptron':
        """Fold the BN into ``fc1`` in place; idempotent. Returns ``self``."""
        if self.folded:
            return self
        replace_branches(self, 'fc1', self.get_equivalent_fc1,
                         partial(nn.Linear, self.fc1.in_features, self.fc1.out_features),
                         clear=['bn'])
        return self


class ChannelGlobalPerceptron(nn.Module):
    """The global perceptron of RepMLPNet (Ding et al., arXiv 2112.11081): channel weights.

    The global mean of each input channel goes through ``fc1 -> ReLU -> fc2 -> sigmoid``
    (``1x1`` convolutions, as in the official RepMLPNet); the block multiplies its output by
    the resulting per-channel weights. Works for inputs of any size; nothing to fold.

    Args:
        in_channels (int): Input channels ``C``.
        out_channels (int): Output channels (one weight each).
        reduction (int): ``fc1`` has ``C // reduction`` outputs. Defaults to 4.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        if not _positive_int(reduction) or in_channels // reduction < 1:
            raise ValueError(f'global perceptron: reduction must be a positive int of at most '
                             f'{in_channels} (in_channels), got {reduction!r}')
        self.fc1 = nn.Conv2d(in_channels, in_channels // reduction, 1)
        self.fc2 = nn.Conv2d(in_channels // reduction, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(N, C, H, W)`` to ``(N, O, 1, 1)`` weights in ``(0, 1)``."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))


@MODELS.register_module()
class RepMLPBlock(BaseModule, Foldable):
    """RepMLP block (arXiv 2105.01883): global, partition and local perceptrons.

    The input is cut into ``h x w`` partitions. The partition perceptron ``fc3`` is a
    grouped fully-connected layer over each flattened partition (``C * h * w`` ->
    ``O * h * w``, a grouped ``1x1`` conv) followed by a BN per output neuron; the local
    perceptron adds conv-BN branches (odd kernels ``k <= h, w``, the same groups, zero
    padding at the partition borders) on the same partitions. At fold time every branch
    becomes an FC matrix (:func:`~mmreparam.models.layers.fuse.conv_to_fc`) and is merged
    into ``fc3``, which is then the only partition-level layer left.

    The global perceptron gives each partition information about the others:

    - ``'partition'`` (the paper's): per-partition channel means -> BN -> MLP, added to
      every pixel of the partition. Its MLP sees all partitions at once, so the block only
      takes inputs of ``input_size``; with a single partition there is no global perceptron
      (as in the paper). Use it for classification and for fixed-size crops
      (the paper's Cityscapes setting: training crops and sliding-window inference).
    - ``'channel'`` (RepMLPNet's): global channel means -> MLP -> sigmoid, multiplying the
      output channels. Works for inputs of any size (detection).
    - None: no global perceptron.

    Inputs whose size is not a multiple of the partition are refused, or with ``pad_input``
    zero-padded at the bottom and right (the paper's "simply pad the input") and the output
    cropped back; padding is not available with the ``'partition'`` perceptron.

    Args:
        in_channels (int): Input channels ``C``.
        out_channels (int): Output channels ``O``.
        partition_size (int | tuple[int, int]): ``(h, w)`` of a partition; ``h != w`` is
            fine. Defaults to 7.
        reparam_conv_kernels (Sequence[int]): Kernel sizes of the local perceptron's conv-BN
            branches (odd, at most ``min(h, w)``, no repeats); empty for none.
            Defaults to ``(1, 3, 5)``.
        groups (int): Groups of ``fc3`` and of the conv branches. Defaults to 1.
        global_perceptron (str, optional): ``'partition'``, ``'channel'`` or None.
            Defaults to ``'partition'``.
        input_size (int | tuple[int, int], optional): ``(H, W)`` of the input; required by
            the ``'partition'`` global perceptron (and used by nothing else).
        gp_reduction (int, optional): Hidden-width reduction of the global perceptron's
            MLP. None gives 1 for ``'partition'`` (RepMLP-Res50) and 4 for ``'channel'``
            (RepMLPNet; at most ``in_channels``).
        pad_input (bool): Zero-pad inputs not divisible by the partition instead of raising.
            Defaults to False.
        norm_cfg (dict): Config of the BatchNorms (any ``_BatchNorm``).
            Defaults to ``dict(type='BN')``.
        deploy (bool): Build the folded structure. Defaults to False.
        init_cfg (dict, optional): mmengine initialization config. Defaults to None.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 partition_size: Size2 = 7,
                 reparam_conv_kernels: Optional[Sequence[int]] = (1, 3, 5),
                 groups: int = 1,
                 global_perceptron: Optional[str] = 'partition',
                 input_size: Optional[Size2] = None,
                 gp_reduction: Optional[int] = None,
                 pad_input: bool = False,
                 norm_cfg: ConfigType = dict(type='BN'),
                 deploy: bool = False,
                 init_cfg: OptConfigType = None):
        super().__init__(init_cfg)
        name = type(self).__name__
        for arg, value in dict(in_channels=in_channels, out_channels=out_channels,
                               groups=groups).items():
            if not _positive_int(value):
                raise ValueError(f'{name}: {arg} must be a positive int, got {value!r}')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{name}: in_channels ({in_channels}) and out_channels '
                             f'({out_channels}) must be divisible by groups ({groups})')
        h, w = _size2(partition_size, 'partition_size', name)
        kernels = tuple(reparam_conv_kernels or ())
        for k in kernels:
            if not _positive_int(k) or k % 2 == 0 or k > min(h, w):
                raise ValueError(f'{name}: reparam_conv_kernels must be odd positive ints no '
                                 f'larger than the {h}x{w} partition, got {kernels}')
        if len(set(kernels)) != len(kernels):
            raise ValueError(f'{name}: reparam_conv_kernels has repeats: {kernels}')
        if global_perceptron not in (*GLOBAL_PERCEPTRONS, None):
            raise ValueError(f'{name}: global_perceptron must be one of '
                             f'{GLOBAL_PERCEPTRONS} or None, got {global_perceptron!r}')
        if global_perceptron == 'partition':
            if input_size is None:
                raise ValueError(f"{name}: global_perceptron='partition' needs input_size "
                                 "(its MLP sees every partition); use 'channel' or None for "
                                 'inputs of any size')
            if pad_input:
                raise ValueError(f"{name}: pad_input does not combine with "
                                 "global_perceptron='partition' (fixed input size)")
            input_size = _size2(input_size, 'input_size', name)
            if input_size[0] % h or input_size[1] % w:
                raise ValueError(f'{name}: input_size {input_size[0]}x{input_size[1]} is not '
                                 f'divisible by the {h}x{w} partition')
        elif input_size is not None:
            raise ValueError(f"{name}: input_size is only used by global_perceptron="
                             f"'partition' (got global_perceptron={global_perceptron!r})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.partition_size = (h, w)
        self.reparam_conv_kernels = kernels
        self.groups = groups
        self.global_perceptron = global_perceptron
        self.input_size = input_size
        self.pad_input = pad_input
        self.deploy = deploy

        self.gp: Optional[nn.Module] = None
        if global_perceptron == 'partition':
            num_partitions = (input_size[0] // h, input_size[1] // w)
            if num_partitions != (1, 1):  # one partition: no global perceptron (paper)
                self.gp = PartitionGlobalPerceptron(
                    in_channels, num_partitions, (h, w),
                    1 if gp_reduction is None else gp_reduction, norm_cfg, deploy)
        elif global_perceptron == 'channel':
            self.gp = ChannelGlobalPerceptron(
                in_channels, out_channels,
                min(4, in_channels) if gp_reduction is None else gp_reduction)
        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=groups,
                             bias=deploy)
        self.fc3_bn = None if deploy else build_bn(norm_cfg, out_channels * h * w)
        if not deploy:
            for k in kernels:
                self.add_module(f'repconv{k}',
                                ConvBNBranch(in_channels, out_channels, k, norm_cfg,
                                             padding=k // 2, groups=groups))

    @property
    def folded(self) -> bool:
        """Whether the block is in its deploy form (``fc3`` with bias, no branches)."""
        return self.fc3_bn is None

    def _local_branches(self):
        if self.folded:
            return []
        return [getattr(self, f'repconv{k}') for k in self.reparam_conv_kernels]

    def _check_input(self, height: int, width: int):
        h, w = self.partition_size
        if self.input_size is not None and (height, width) != self.input_size:
            raise ValueError(
                f"{type(self).__name__} with global_perceptron='partition' takes "
                f'{self.input_size[0]}x{self.input_size[1]} inputs only (its MLP sees every '
                f"partition), got {height}x{width}; use global_perceptron='channel' or None "
                'for inputs of any size')
        if (height % h or width % w) and not self.pad_input:
            raise ValueError(f'{type(self).__name__}: input {height}x{width} is not divisible '
                             f'by the {h}x{w} partition; pass pad_input=True to zero-pad it')

    def forward(self, x: Tensor) -> Tensor:
        """Global perceptron, then partition + local perceptrons on each partition."""
        n, _, height, width = x.shape
        self._check_input(height, width)
        h, w = self.partition_size
        inputs = x
        if isinstance(self.gp, PartitionGlobalPerceptron):
            hp, wp = height // h, width // w
            added = self.gp(x).reshape(n, -1, hp, 1, wp, 1)
            x = (x.reshape(n, -1, hp, h, wp, w) + added).reshape(x.shape)
        pad_h, pad_w = -height % h, -width % w
        if pad_h or pad_w:
            x = F.pad(x, [0, pad_w, 0, pad_h])
        hp, wp = x.shape[2] // h, x.shape[3] // w
        # (N, C, hp*h, wp*w) -> (N*hp*wp, C, h, w): one sample per partition.
        parts = x.reshape(n, -1, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5).reshape(
            n * hp * wp, -1, h, w)
        out = self.fc3(parts.reshape(n * hp * wp, -1, 1, 1))
        if self.fc3_bn is not None:
            out = self.fc3_bn(out)
        out = out.reshape(n * hp * wp, -1, h, w)
        for branch in self._local_branches():
            out = out + branch(parts)
        out = out.reshape(n, hp, wp, -1, h, w).permute(0, 3, 1, 4, 2, 5).reshape(
            n, -1, hp * h, wp * w)
        if pad_h or pad_w:
            out = out[:, :, :height, :width]
        if isinstance(self.gp, ChannelGlobalPerceptron):
            out = out * self.gp(inputs)
        return out

    def get_equivalent_fc3(self) -> Tuple[Tensor, Tensor]:
        """Weight and bias of the one ``fc3`` equal to the partition + local perceptrons.

        The weight is that of the grouped ``1x1`` convolution ``fc3``,
        ``(O * h * w, C * h * w / groups, 1, 1)``; the bias is ``(O * h * w,)``. Computed from
        the eval-mode BNs and differentiable in every branch parameter.
        """
        if self.folded:
            return self.fc3.weight, self.fc3.bias
        weight, bias = fuse_bn(self.fc3.weight, self.fc3_bn)
        branches = self._local_branches()
        if branches:
            size = max(self.reparam_conv_kernels)
            fused = [branch.get_equivalent_kernel_bias() for branch in branches]
            kernel = sum(pad_kernel(k, size) for k, _ in fused)
            conv_bias = sum(b for _, b in fused)
            fc_weight, fc_bias = conv_to_fc(kernel, conv_bias, self.partition_size,
                                            self.groups)
            weight = weight + fc_weight.reshape(weight.shape)
            bias = bias + fc_bias
        return weight, bias

    def fold(self) -> 'RepMLPBlock':
        """Merge the local perceptron and the BNs into ``fc1`` and ``fc3``, in place.

        Idempotent: a folded or ``deploy=True`` block is returned unchanged; the state_dict
        of a folded block loads strictly into a ``deploy=True`` block.

        Returns:
            RepMLPBlock: ``self``.
        """
        if self.folded:
            return self
        replace_branches(self, 'fc3', self.get_equivalent_fc3,
                         partial(nn.Conv2d, self.fc3.in_channels, self.fc3.out_channels, 1,
                                 groups=self.groups, bias=True),
                         delete=[f'repconv{k}' for k in self.reparam_conv_kernels],
                         clear=['fc3_bn'])
        if isinstance(self.gp, Foldable):
            self.gp.fold()
        self.deploy = True
        return self

    def extra_repr(self) -> str:
        h, w = self.partition_size
        return (f'{self.in_channels}, {self.out_channels}, partition_size=({h}, {w}), '
                f'reparam_conv_kernels={self.reparam_conv_kernels}, groups={self.groups}, '
                f'global_perceptron={self.global_perceptron!r}, folded={self.folded}')
