"""OREPA: Online Convolutional Re-parameterization (Hu et al., CVPR 2022).

OREPA replaces DBB's per-branch BatchNorms by learned per-channel scales (``vector``), so
the whole block is *linear* in its parameters before its single BN: training generates one
kernel from the over-parameterized branches, runs one convolution and one BN. The fold is
then only the BN fusion of the generated kernel.

Parameter names follow the official implementation (JUGGHM/OREPA_CVPR2022), so that its
training checkpoints map by key renaming. The helper tensors (identity, frequency prior) are
non-persistent (or computed on the fly) here: they do not belong in checkpoints.
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from .base import ReparamBlock, build_bn
from .branches import RepVGGBlock
from .fuse import compose_kernels, frequency_prior, fuse_bn, identity_kernel
from .orepa_function import OREPA1x1KernelFunction, OREPAKernelFunction

#: Initial branch scales of the official OREPA block (rows of ``vector``).
OREPA_VECTOR_INIT = dict(origin=0.25, avg=0.25, prior=0.0, conv1x1_kxk=0.5, conv1x1=1.0,
                         dw_pw=0.5)


def full_precision(device_type: str):
    """A context that turns autocast off on ``device_type`` (kernels are generated in the
    parameters' precision); a no-op where autocast does not exist (e.g. ``meta``)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class OREPAGeneratorMixin:
    """The kernel generator of OREPA, shared by :class:`OREPA` and :class:`OREPAKernel`.

    Branches, each scaled per output channel by a row of ``vector``:

    - ``origin``: a ``kxk`` kernel;
    - ``avg``: a ``1x1`` followed by ``kxk`` averaging;
    - ``prior``: a ``1x1`` followed by a fixed per-channel frequency prior (DCT basis);
    - ``conv1x1_kxk``: an identity-initialised ``1x1`` followed by a ``kxk``;
    - ``conv1x1``: a ``1x1`` (optional: the OREPA-VGG generator has none);
    - ``dw_pw``: a depthwise ``kxk`` (8 filters per input channel) followed by a ``1x1``.
    """

    def _init_generator(self,
                        in_channels: int,
                        out_channels: int,
                        kernel_size: int,
                        groups: int,
                        internal_channels: Optional[int] = None,
                        with_conv1x1: bool = True,
                        expand_ratio: int = 8,
                        kaiming_a: float = 0.0,
                        vector_init: Optional[dict] = None):
        if internal_channels is None:  # the official rule
            internal_channels = in_channels if groups <= 4 else 2 * in_channels
        if internal_channels % groups:
            raise ValueError(f'internal_channels ({internal_channels}) must be divisible by '
                             f'groups ({groups})')
        i_g, k = in_channels // groups, kernel_size
        self.gen_in_channels = in_channels
        self.gen_out_channels = out_channels
        self.gen_kernel_size = kernel_size
        self.gen_groups = groups
        self.internal_channels = internal_channels
        self.branch_names: Tuple[str, ...] = (
            ('origin', 'avg', 'prior', 'conv1x1_kxk') + (('conv1x1', ) if with_conv1x1 else ())
            + ('dw_pw', ))

        def param(*shape):
            weight = nn.Parameter(torch.empty(*shape))
            nn.init.kaiming_uniform_(weight, a=kaiming_a)
            return weight

        self.weight_orepa_origin = param(out_channels, i_g, k, k)
        self.weight_orepa_avg_conv = param(out_channels, i_g, 1, 1)
        self.weight_orepa_pfir_conv = param(out_channels, i_g, 1, 1)
        if with_conv1x1:
            self.weight_orepa_1x1 = param(out_channels, i_g, 1, 1)
        # Offset from the identity (zero-initialised): the branch starts as a plain kxk.
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(
            torch.zeros(internal_channels, i_g, 1, 1))
        self.weight_orepa_1x1_kxk_conv2 = param(out_channels, internal_channels // groups, k, k)
        self.weight_orepa_gconv_dw = param(in_channels * expand_ratio, 1, k, k)
        self.weight_orepa_gconv_pw = param(out_channels, in_channels * expand_ratio // groups,
                                           1, 1)
        init = dict(OREPA_VECTOR_INIT, **(vector_init or {}))
        self.vector = nn.Parameter(
            torch.tensor([[init[name]] * out_channels for name in self.branch_names]))
        self.register_buffer('id_tensor',
                             identity_kernel(internal_channels, 1, groups,
                                             in_channels=in_channels), persistent=False)

    def frequency_prior(self) -> Tensor:
        """The fixed ``(out, k, k)`` prior, computed in float64 and cast to the params' dtype.

        Computed on the fly (it costs ``out * k * k`` cosines), so it is exact in any dtype the
        module is converted to.
        """
        return frequency_prior(self.gen_out_channels, self.gen_kernel_size,
                               dtype=self.vector.dtype, device=self.vector.device)

    def _scale(self, name: str) -> Tensor:
        return self.vector[self.branch_names.index(name)].reshape(-1, 1, 1, 1)

    def generate_kernel(self) -> Tensor:
        """The generated ``(out, in/groups, k, k)`` kernel (differentiable).

        The kernel-sized work runs in one fused autograd node
        (:class:`~mmreparam.models.layers.orepa_function.OREPAKernelFunction`); the branches
        that are a ``1x1`` weight times a fixed per-channel ``kxk`` pattern (average, prior,
        centre tap) enter it as one ``(out, p, in/groups)`` weight tensor with their ``(p, out)``
        scales.
        """
        k = self.gen_kernel_size
        out, in_g = self.weight_orepa_origin.shape[:2]
        names = ['avg', 'prior']
        weights = [self.weight_orepa_avg_conv, self.weight_orepa_pfir_conv]
        prior = self.frequency_prior().reshape(out, k * k)
        patterns = [torch.full_like(prior[:1], 1.0 / (k * k)).expand(out, k * k), prior]
        if 'conv1x1' in self.branch_names:
            names.append('conv1x1')
            weights.append(self.weight_orepa_1x1)
            centre = torch.zeros_like(prior[:1])
            centre[0, (k * k) // 2] = 1
            patterns.append(centre.expand(out, k * k))
        coef = torch.stack([w.reshape(out, in_g) for w in weights], dim=1)
        pattern = torch.stack(patterns, dim=1)
        vector, index = self.vector, self.branch_names.index
        v_coef = vector[[index(name) for name in names]]
        conv1 = self.weight_orepa_1x1_kxk_idconv1 + self.id_tensor
        with full_precision(vector.device.type):
            return OREPAKernelFunction.apply(
                self.weight_orepa_origin, vector[index('origin')], coef, v_coef, pattern,
                self.weight_orepa_1x1_kxk_conv2, conv1.reshape(self.internal_channels, in_g),
                vector[index('conv1x1_kxk')], self.weight_orepa_gconv_pw.reshape(out, -1),
                self.weight_orepa_gconv_dw.reshape(self.weight_orepa_gconv_dw.shape[0], k * k),
                vector[index('dw_pw')], self.gen_groups)


class GeneratedKernelBlock(ReparamBlock):
    """A block whose training form is: generate one kernel -> one conv -> one BN.

    Subclasses implement ``generate_kernel()`` (differentiable); the forward pass and the fold
    (BN fusion of the generated kernel) are shared.
    """

    def generate_kernel(self) -> Tensor:
        """The ``(out, in/groups, k, k)`` kernel of the linear part before the BN."""
        raise NotImplementedError

    def _forward_branches(self, x: Tensor) -> Tensor:
        return self.bn(F.conv2d(x, self.generate_kernel(), None, self.stride, self.padding,
                                self.dilation, self.groups))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The generated kernel with the BN folded in."""
        return fuse_bn(self.generate_kernel(), self.bn)


class OREPAKernel(OREPAGeneratorMixin, nn.Module):
    """An OREPA kernel generator on its own (no convolution, no BN).

    Used as the stacked ``3x3`` generators of :class:`OREPALargeConv`. ``forward()`` takes
    no input and returns the kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 groups: int = 1, **generator_kwargs):
        super().__init__()
        self._init_generator(in_channels, out_channels, kernel_size, groups, **generator_kwargs)

    def forward(self) -> Tensor:
        """Return the generated kernel."""
        return self.generate_kernel()


@MODELS.register_module()
class OREPA(OREPAGeneratorMixin, GeneratedKernelBlock):
    """OREPA ``kxk`` block: generated kernel -> one conv -> one BN (-> act).

    Args:
        internal_channels_1x1_3x3 (int, optional): Width of the ``1x1 -> kxk`` branch;
            None gives ``in_channels`` when ``groups <= 4``, else ``2 * in_channels``
            (official rule). Defaults to None.
        with_conv1x1 (bool): Include the plain ``1x1`` branch. Defaults to True.
        kaiming_a (float): ``a`` of the Kaiming-uniform initialisation. Defaults to 0.
        vector_init (dict, optional): Initial branch scales by branch name, overriding
            :data:`OREPA_VECTOR_INIT`. Defaults to None.
        Others: see :class:`ReparamBlock`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = None, deploy: bool = False,
                 internal_channels_1x1_3x3: Optional[int] = None, with_conv1x1: bool = True,
                 kaiming_a: float = 0.0, vector_init: Optional[dict] = None,
                 init_cfg: OptConfigType = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, norm_cfg, act_cfg, deploy, init_cfg)
        if deploy:
            return
        self._init_generator(in_channels, out_channels, kernel_size, groups,
                             internal_channels_1x1_3x3, with_conv1x1, kaiming_a=kaiming_a,
                             vector_init=vector_init)
        self.bn = build_bn(norm_cfg, out_channels)


@MODELS.register_module()
class OREPA1x1(GeneratedKernelBlock):
    """OREPA ``1x1`` block: ``v0 * W + v1 * (C2 @ C1)``, then one conv and one BN.

    The product branch has an identity factor (a trainable matrix initialised to the
    identity) on the side of the smaller channel count, as in the official ``OREPA_1x1``.
    Groups are not supported (as in the official block). See :class:`ReparamBlock`.
    """
    _supports_groups = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = None, deploy: bool = False,
                 init_cfg: OptConfigType = None):
        if kernel_size != 1:
            raise ValueError(f'OREPA1x1 needs kernel_size=1 (got {kernel_size}); '
                             'use OREPA or OREPALargeConv')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, norm_cfg, act_cfg, deploy, init_cfg)
        if deploy:
            return

        def param(*shape):
            weight = nn.Parameter(torch.empty(*shape))
            nn.init.kaiming_uniform_(weight, a=1.0)
            return weight

        self.weight_or1x1_origin = param(out_channels, in_channels, 1, 1)
        if out_channels > in_channels:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(
                torch.eye(in_channels).reshape(in_channels, in_channels, 1, 1))
            self.weight_or1x1_l2i_conv2 = param(out_channels, in_channels, 1, 1)
        else:
            self.weight_or1x1_l2i_conv1 = param(out_channels, in_channels, 1, 1)
            self.weight_or1x1_l2i_conv2 = nn.Parameter(
                torch.eye(out_channels).reshape(out_channels, out_channels, 1, 1))
        self.vector = nn.Parameter(torch.tensor([[1.0] * out_channels, [0.5] * out_channels]))
        self.bn = build_bn(norm_cfg, out_channels)

    def generate_kernel(self) -> Tensor:
        """The generated ``(out, in, 1, 1)`` kernel (differentiable)."""
        out, in_ = self.weight_or1x1_origin.shape[:2]
        v_origin, v_product = self.vector
        with full_precision(v_origin.device.type):
            kernel = OREPA1x1KernelFunction.apply(
                self.weight_or1x1_origin.reshape(out, in_), v_origin,
                self.weight_or1x1_l2i_conv2.reshape(out, -1),
                self.weight_or1x1_l2i_conv1.reshape(-1, in_), v_product)
        return kernel.reshape(out, in_, 1, 1)


@MODELS.register_module()
class OREPALargeConv(GeneratedKernelBlock):
    """OREPA large-kernel block: ``(k-1)/2`` stacked ``3x3`` generators -> one ``kxk``.

    The ``kxk`` kernel (odd ``k >= 5``) is the composition of ``(k-1)/2`` OREPA ``3x3``
    kernels (``weight0``, ``weight1``, ...; ``out_channels`` wide inside), then one conv and
    one BN. This is the deep linear stem of OREPA-ResNet (``7x7``: three generators). As in
    the official implementation, the generators after the first enter the composition
    spatially flipped (it chains cross-correlations), so official checkpoints keep their
    meaning. Groups are not supported. See :class:`ReparamBlock` for the arguments.
    """
    _supports_groups = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = None, deploy: bool = False,
                 init_cfg: OptConfigType = None):
        if kernel_size < 5 or kernel_size % 2 == 0:
            raise ValueError(f'OREPALargeConv needs an odd kernel_size >= 5 (got '
                             f'{kernel_size}); use OREPA for 3x3')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, norm_cfg, act_cfg, deploy, init_cfg)
        if deploy:
            return
        self.num_generators = (kernel_size - 1) // 2
        for i in range(self.num_generators):
            self.add_module(f'weight{i}',
                            OREPAKernel(in_channels if i == 0 else out_channels,
                                        out_channels, 3))
        self.bn = build_bn(norm_cfg, out_channels)

    def generate_kernel(self) -> Tensor:
        """The composed ``(out, in, k, k)`` kernel (differentiable)."""
        kernel = self.weight0()
        for i in range(1, self.num_generators):
            kernel = compose_kernels(kernel, getattr(self, f'weight{i}')().flip(-2, -1))
        return kernel


@MODELS.register_module()
class OREPAVGGBlock(RepVGGBlock):
    """RepVGG block with an OREPA ``kxk`` branch (the official ``RepVGGBlock_OREPA``).

    ``OREPA-kxk-BN + 1x1-BN (+ identity-BN)``: the dense branch is an OREPA generator
    without its own ``1x1`` branch (RepVGG has one), initialised as in the official
    ``OREPA_3x3_RepVGG``. Arguments as :class:`RepVGGBlock`.
    """

    def _build_linear_branches(self):
        super()._build_linear_branches()
        internal = self.in_channels if self.groups < self.out_channels else 2 * self.in_channels
        self.rbr_dense = OREPA(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.norm_cfg, act_cfg=None,
            internal_channels_1x1_3x3=internal, with_conv1x1=False, kaiming_a=1.0)
