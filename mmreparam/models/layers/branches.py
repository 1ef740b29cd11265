"""Blocks whose training-time form is a sum of parallel conv-BN branches.

``ConvBN`` (the plain baseline), ``ACB`` (ACNet), ``DBB`` (Diverse Branch Block),
``RepVGGBlock`` and ``QARepVGGBlock``. Parameter names follow the official implementations
(ACNet/DBB by DingXiaoH, RepVGG, YOLOv6's QARepVGG) so that their checkpoints map by
renaming the folded conv only.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType
from .base import ReparamBlock, build_bn, put_bn
from .fuse import (
    Affine,
    avg_kernel,
    bn_pad_value,
    fuse_bn,
    identity_kernel,
    merge_1x1_depthwise,
    merge_1x1_kxk,
    pad_kernel,
)
from .se import SEBlock


class ConvBNBranch(nn.Module):
    """A bias-free convolution followed by a BatchNorm (one branch of a block).

    Args:
        in_channels (int), out_channels (int): Channels.
        kernel_size (int | tuple): Kernel size.
        norm_cfg (dict): BatchNorm config.
        **conv_kwargs: stride, padding, dilation, groups of the convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, norm_cfg: ConfigType,
                 **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False,
                              **conv_kwargs)
        self.bn = build_bn(norm_cfg, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """conv -> BN."""
        return self.bn(self.conv(x))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Kernel and bias of conv -> BN (eval-mode BN)."""
        return fuse_bn(self.conv.weight, self.bn)


class BNAndPad(nn.Module):
    """BatchNorm, then padding with the BN's response to zero instead of zeros.

    ``pad(BN(y), value=BN(0))`` equals ``BN(pad(y, 0))`` channel by channel, so a
    ``1x1 -> BN -> kxk`` chain built with this layer folds exactly into one padded ``kxk``
    convolution (DBB). The padding value uses the running statistics, as in eval mode.
    """

    def __init__(self, num_features: int, pad: int, norm_cfg: ConfigType):
        super().__init__()
        self.bn = build_bn(norm_cfg, num_features)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        """BN, then pad ``self.pad`` pixels per side with the BN's value for a zero input."""
        out = self.bn(x)
        if self.pad == 0:
            return out
        value = bn_pad_value(self.bn).detach().to(out.dtype).reshape(1, -1, 1, 1)
        return F.pad(out - value, [self.pad] * 4) + value


@MODELS.register_module()
class ConvBN(ReparamBlock):
    """A convolution followed by a BatchNorm: the plain block, folded into a biased conv.

    Takes any kernel size and padding. See :class:`ReparamBlock` for the arguments.
    """
    _needs_same_padding = False
    state_markers = ('conv.weight', )
    reparam_names = ('base', )
    chosen_kernel_sizes = (1, None)  # every conv: the plain block of every reparam

    def _build_branches(self) -> None:
        self.conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                              self.stride, self.padding, self.dilation, self.groups,
                              bias=False)
        self.bn = build_bn(self.norm_cfg, self.out_channels)

    def _forward_branches(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Kernel and bias of conv -> BN."""
        return fuse_bn(self.conv.weight, self.bn)

    def kernel_and_affine(self) -> Tuple[Tensor, Affine]:
        """The conv's kernel and its BN (kept as it is)."""
        if self.reparam_conv is not None:
            return super().kernel_and_affine()
        return self.conv.weight, Affine.of(self.bn)

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        state['conv.weight'] = kernel
        put_bn(state, 'bn.', self.bn, affine)


@MODELS.register_module()
class ACB(ReparamBlock):
    """Asymmetric Convolution Block (ACNet, Ding et al., ICCV 2019).

    ``kxk-BN + 1xk-BN + kx1-BN``; the asymmetric kernels fold onto the middle row and
    column of the square kernel. Needs an odd ``kernel_size >= 3`` and "same" padding.
    See :class:`ReparamBlock` for the arguments.
    """
    _min_kernel_size = 3
    default_kernel_size = 3
    state_markers = ('square_conv.weight', )
    reparam_names = ('ACB', )

    def _build_branches(self) -> None:
        k, p, norm_cfg = self.kernel_size, self.padding, self.norm_cfg
        in_channels, out_channels = self.in_channels, self.out_channels
        common = dict(stride=self.stride, dilation=self.dilation, groups=self.groups,
                      bias=False)
        self.square_conv = nn.Conv2d(in_channels, out_channels, (k, k), padding=(p, p),
                                     **common)
        self.square_bn = build_bn(norm_cfg, out_channels)
        self.ver_conv = nn.Conv2d(in_channels, out_channels, (k, 1), padding=(p, 0), **common)
        self.ver_bn = build_bn(norm_cfg, out_channels)
        self.hor_conv = nn.Conv2d(in_channels, out_channels, (1, k), padding=(0, p), **common)
        self.hor_bn = build_bn(norm_cfg, out_channels)

    def _forward_branches(self, x: Tensor) -> Tensor:
        return (self.square_bn(self.square_conv(x)) + self.ver_bn(self.ver_conv(x))
                + self.hor_bn(self.hor_conv(x)))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Sum of the three fused branches, the asymmetric ones centred in ``kxk``."""
        k = self.kernel_size
        kernel, bias = fuse_bn(self.square_conv.weight, self.square_bn)
        for conv, bn in ((self.ver_conv, self.ver_bn), (self.hor_conv, self.hor_bn)):
            k_b, b_b = fuse_bn(conv.weight, bn)
            kernel = kernel + pad_kernel(k_b, k)
            bias = bias + b_b
        return kernel, bias

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        state['square_conv.weight'] = kernel
        put_bn(state, 'square_bn.', self.square_bn, affine)
        put_bn(state, 'ver_bn.', self.ver_bn)
        put_bn(state, 'hor_bn.', self.hor_bn)


@MODELS.register_module()
class DBB(ReparamBlock):
    """Diverse Branch Block (Ding et al., CVPR 2021).

    Branches: ``kxk-BN`` (``dbb_origin``); ``1x1-BN`` (``dbb_1x1``, when
    ``groups < out_channels``); ``[1x1-BN-pad]-avg-BN`` (``dbb_avg``); and
    ``1x1(identity-initialised)-BN-pad-kxk-BN`` (``dbb_1x1_kxk``). The BNs in the middle of
    the sequential branches pad with their own output for a zero input (:class:`BNAndPad`),
    which keeps the fold exact at the borders. With ``dilation > 1`` the averaging branch
    averages over the dilated ``kxk`` taps, so it stays foldable into the dilated kernel.

    Args:
        internal_channels_1x1_3x3 (int, optional): Width of the ``1x1 -> kxk`` branch;
            None gives ``in_channels`` (identity-initialised) when ``groups < out_channels``,
            else ``2 * in_channels``, as in the official code. Defaults to None.
        Others: see :class:`ReparamBlock`.
    """
    _min_kernel_size = 3
    default_kernel_size = 3
    state_markers = ('dbb_origin.conv.weight', )
    reparam_names = ('DBB', )

    def __init__(self, *args, internal_channels_1x1_3x3: Optional[int] = None, **kwargs):
        self.internal_channels_1x1_3x3 = internal_channels_1x1_3x3
        super().__init__(*args, **kwargs)

    def _build_branches(self) -> None:
        p, norm_cfg, groups = self.padding, self.norm_cfg, self.groups
        in_channels, out_channels = self.in_channels, self.out_channels
        kernel_size, stride, dilation = self.kernel_size, self.stride, self.dilation
        self.dbb_origin = ConvBNBranch(in_channels, out_channels, kernel_size, norm_cfg,
                                       stride=stride, padding=p, dilation=dilation,
                                       groups=groups)
        self.has_1x1 = groups < out_channels
        if self.has_1x1:
            self.dbb_1x1 = ConvBNBranch(in_channels, out_channels, 1, norm_cfg, stride=stride,
                                        groups=groups)
        # The averaging branch starts with a 1x1 unless it can average its input directly.
        self.dbb_avg = nn.Module()
        if self.has_1x1 or in_channels != out_channels:
            self.dbb_avg.conv = nn.Conv2d(in_channels, out_channels, 1, groups=groups,
                                          bias=False)
            self.dbb_avg.bn = BNAndPad(out_channels, p, norm_cfg)
        self.dbb_avg.avgbn = build_bn(norm_cfg, out_channels)

        internal = self.internal_channels_1x1_3x3
        if internal is None:
            internal = in_channels if self.has_1x1 else 2 * in_channels
        if internal % groups:
            raise ValueError(f'internal_channels_1x1_3x3 ({internal}) must be divisible by '
                             f'groups ({groups})')
        self.dbb_1x1_kxk = nn.Module()
        if internal == in_channels:
            # Identity-based 1x1: the parameter is the offset from the identity.
            self.dbb_1x1_kxk.idconv1 = nn.Module()
            self.dbb_1x1_kxk.idconv1.weight = nn.Parameter(
                torch.zeros(in_channels, in_channels // groups, 1, 1))
        else:
            self.dbb_1x1_kxk.conv1 = nn.Conv2d(in_channels, internal, 1, groups=groups,
                                               bias=False)
        self.dbb_1x1_kxk.bn1 = BNAndPad(internal, p, norm_cfg)
        self.dbb_1x1_kxk.conv2 = nn.Conv2d(internal, out_channels, kernel_size, stride, 0,
                                           dilation, groups, bias=False)
        self.dbb_1x1_kxk.bn2 = build_bn(norm_cfg, out_channels)

    def _first_1x1_kernel(self) -> Tensor:
        branch = self.dbb_1x1_kxk
        if hasattr(branch, 'idconv1'):
            weight = branch.idconv1.weight
            return weight + identity_kernel(self.in_channels, 1, self.groups,
                                            dtype=weight.dtype, device=weight.device)
        return branch.conv1.weight

    def _avg(self, x: Tensor, padding: int) -> Tensor:
        if self.dilation == 1:
            return F.avg_pool2d(x, self.kernel_size, self.stride, padding)
        # Average over the dilated taps: a depthwise conv with a constant kernel.
        kernel = avg_kernel(x.shape[1], self.kernel_size, x.shape[1], dtype=x.dtype,
                            device=x.device)
        return F.conv2d(x, kernel, None, self.stride, padding, self.dilation, x.shape[1])

    def _forward_branches(self, x: Tensor) -> Tensor:
        out = self.dbb_origin(x)
        if self.has_1x1:
            out = out + self.dbb_1x1(x)
        avg = self.dbb_avg
        if hasattr(avg, 'conv'):
            y = self._avg(avg.bn(avg.conv(x)), 0)
        else:
            y = self._avg(x, self.padding)
        out = out + avg.avgbn(y)
        branch = self.dbb_1x1_kxk
        y = F.conv2d(x, self._first_1x1_kernel(), None, 1, 0, 1, self.groups)
        y = branch.bn2(branch.conv2(branch.bn1(y)))
        return out + y

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Sum of the fused branches; sequential ones merged with :func:`merge_1x1_kxk`."""
        k, g = self.kernel_size, self.groups
        kernel, bias = self.dbb_origin.get_equivalent_kernel_bias()
        if self.has_1x1:
            k_b, b_b = self.dbb_1x1.get_equivalent_kernel_bias()
            kernel, bias = kernel + pad_kernel(k_b, k), bias + b_b

        avg = self.dbb_avg
        ref = avg.avgbn.running_mean
        if hasattr(avg, 'conv'):
            k_avg, b_avg = fuse_bn(avg_kernel(self.out_channels, k, self.out_channels,
                                              dtype=kernel.dtype, device=ref.device),
                                   avg.avgbn)
            k1, b1 = fuse_bn(avg.conv.weight, avg.bn.bn)
            k_b, b_b = merge_1x1_depthwise(k1, b1, k_avg, b_avg)
        else:
            k_b, b_b = fuse_bn(avg_kernel(self.out_channels, k, g, dtype=kernel.dtype,
                                          device=ref.device), avg.avgbn)
        kernel, bias = kernel + k_b, bias + b_b

        branch = self.dbb_1x1_kxk
        k1, b1 = fuse_bn(self._first_1x1_kernel(), branch.bn1.bn)
        k2, b2 = fuse_bn(branch.conv2.weight, branch.bn2)
        k_b, b_b = merge_1x1_kxk(k1, b1, k2, b2, g)
        return kernel + k_b, bias + b_b

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        state['dbb_origin.conv.weight'] = kernel
        put_bn(state, 'dbb_origin.bn.', self.dbb_origin.bn, affine)
        if self.has_1x1:
            put_bn(state, 'dbb_1x1.bn.', self.dbb_1x1.bn)
        put_bn(state, 'dbb_avg.avgbn.', self.dbb_avg.avgbn)
        put_bn(state, 'dbb_1x1_kxk.bn2.', self.dbb_1x1_kxk.bn2)


@MODELS.register_module()
class RepVGGBlock(ReparamBlock):
    """RepVGG block (Ding et al., CVPR 2021): ``kxk-BN + 1x1-BN (+ identity-BN)``.

    The identity branch (a BatchNorm of the input) exists when ``in_channels ==
    out_channels`` and ``stride == 1``. With ``use_se`` an SE module follows the sum
    (it is kept by the fold).

    Args:
        use_se (bool): Add a squeeze-and-excitation module. Defaults to False.
        se_ratio (int): SE reduction ratio. Defaults to 16.
        act_cfg (dict, optional): Defaults to ``dict(type='ReLU')``.
        Others: see :class:`ReparamBlock`.
    """
    _min_kernel_size = 3
    default_kernel_size = 3
    default_act_cfg = dict(type='ReLU')
    state_markers = ('rbr_dense.conv.weight', )
    reparam_names = ('RepVGG', )

    def __init__(self, *args, use_se: bool = False, se_ratio: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        if use_se:
            self.se = SEBlock(self.out_channels, self.out_channels // se_ratio)

    def _build_branches(self) -> None:
        """The dense, 1x1 and identity branches (:class:`OREPAVGGBlock` swaps the dense)."""
        if self.in_channels == self.out_channels and self.stride == 1:
            self.rbr_identity = build_bn(self.norm_cfg, self.in_channels)
        else:
            self.rbr_identity = None
        self.rbr_dense = ConvBNBranch(self.in_channels, self.out_channels, self.kernel_size,
                                      self.norm_cfg, stride=self.stride, padding=self.padding,
                                      dilation=self.dilation, groups=self.groups)
        self.rbr_1x1 = ConvBNBranch(self.in_channels, self.out_channels, 1, self.norm_cfg,
                                    stride=self.stride, groups=self.groups)

    def _forward_branches(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return out

    def _side_kernel_bias(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Fused 1x1 and identity branches, as a ``kxk`` kernel and a bias."""
        kernel, bias = self.rbr_1x1.get_equivalent_kernel_bias()
        kernel = pad_kernel(kernel, self.kernel_size)
        if self.rbr_identity is not None:
            ident = identity_kernel(self.in_channels, self.kernel_size, self.groups,
                                    dtype=like.dtype, device=like.device)
            k_id, b_id = fuse_bn(ident, self.rbr_identity)
            kernel, bias = kernel + k_id, bias + b_id
        return kernel, bias

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Dense + 1x1 (centred) + identity, each with its BN folded."""
        kernel, bias = self.rbr_dense.get_equivalent_kernel_bias()
        k_side, b_side = self._side_kernel_bias(kernel)
        return kernel + k_side, bias + b_side

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        self._expand_dense(state, kernel, affine)
        put_bn(state, 'rbr_1x1.bn.', self.rbr_1x1.bn)
        if self.rbr_identity is not None:
            put_bn(state, 'rbr_identity.', self.rbr_identity)

    def _expand_dense(self, state: Dict[str, Tensor], kernel: Tensor, affine: Affine) -> None:
        """The dense branch alone computes the function."""
        state['rbr_dense.conv.weight'] = kernel
        put_bn(state, 'rbr_dense.bn.', self.rbr_dense.bn, affine)


@MODELS.register_module()
class QARepVGGBlock(RepVGGBlock):
    """Quantization-aware RepVGG block (Chu et al., "Make RepVGG Greater Again: A
    Quantization-aware Approach", AAAI 2024; QARepVGGBlock of YOLOv6).

    ``BN(kxk-BN(x) + 1x1(x) (+ x))``: the ``1x1`` and identity branches have no BatchNorm
    of their own and one BN follows the sum, which keeps the folded kernel's and bias's
    ranges close to the trained ones (the paper's remedy for RepVGG's int8 collapse). Names
    follow YOLOv6 (``rbr_dense.conv`` / ``rbr_dense.bn``, ``rbr_1x1`` a bias-free conv,
    ``bn`` after the sum). Arguments as :class:`RepVGGBlock`.
    """
    state_markers = ('rbr_dense.conv.weight', 'rbr_1x1.weight')
    reparam_names = ('QARepVGG', )

    def _build_branches(self) -> None:
        self.has_identity = self.in_channels == self.out_channels and self.stride == 1
        self.rbr_dense = ConvBNBranch(self.in_channels, self.out_channels, self.kernel_size,
                                      self.norm_cfg, stride=self.stride, padding=self.padding,
                                      dilation=self.dilation, groups=self.groups)
        self.rbr_1x1 = nn.Conv2d(self.in_channels, self.out_channels, 1, self.stride,
                                 groups=self.groups, bias=False)
        self.bn = build_bn(self.norm_cfg, self.out_channels)

    def _forward_branches(self, x: Tensor) -> Tensor:
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.has_identity:
            out = out + x
        return self.bn(out)

    def _sum_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Kernel and bias of the sum before the last BN."""
        kernel, bias = self.rbr_dense.get_equivalent_kernel_bias()
        kernel = kernel + pad_kernel(self.rbr_1x1.weight, self.kernel_size)
        if self.has_identity:
            kernel = kernel + identity_kernel(self.in_channels, self.kernel_size, self.groups,
                                              dtype=kernel.dtype, device=kernel.device)
        return kernel, bias

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The sum's kernel and bias with the last BN folded in."""
        kernel, bias = self._sum_kernel_bias()
        return fuse_bn(kernel, self.bn, bias)

    def kernel_and_affine(self) -> Tuple[Tensor, Affine]:
        """The sum's kernel, and the last BN (the dense bias moved into its mean)."""
        if self.reparam_conv is not None:
            return super().kernel_and_affine()
        kernel, bias = self._sum_kernel_bias()
        affine = Affine.of(self.bn)
        return kernel, affine._replace(mean=affine.mean - bias)

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        # The identity cannot be switched off: the dense kernel carries the rest.
        if self.has_identity:
            kernel = kernel - identity_kernel(self.in_channels, self.kernel_size, self.groups,
                                              dtype=kernel.dtype)
        state['rbr_dense.conv.weight'] = kernel
        put_bn(state, 'rbr_dense.bn.', self.rbr_dense.bn, Affine(torch.zeros_like(affine.bias)))
        state['rbr_1x1.weight'] = torch.zeros_like(state['rbr_1x1.weight'])
        put_bn(state, 'bn.', self.bn, affine)
