"""RepOpt-VGG's CSLA block and its two rules (Ding et al., ICLR 2023, arXiv 2205.15242).

A *CSLA* block (constant-scale linear addition; the official ``LinearAddBlock``)

    ``y = BN(s * conv3x3(x, W3) + t * conv1x1(x, W1) + w_id * x)``

with per-channel constants ``s``, ``t`` and a trainable per-channel ``w_id``, trained with
SGD, computes at every step exactly what the plain ``y = BN(conv3x3(x, W))`` computes when
``W`` starts at ``s * W3 + t * W1 + w_id * I`` (:func:`repopt_kernel`, the *Rule of
Initialization*) and its gradient is multiplied element-wise by the fixed *Grad Mult*
``s^2 + t^2 [centre] + 1 [identity taps]`` (:func:`repopt_grad_mult`, the *Rule of
Iteration*). The scales of one block are a dict keyed by :data:`SCALE_KEYS`.
"""
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ...registry import MODELS
from .base import ReparamBlock, build_bn
from .fuse import fuse_bn, identity_kernel, pad_kernel

#: The branches of a CSLA block that carry a scale; 'identity' only where the block has one.
SCALE_KEYS = ('conv', 'conv_1x1', 'identity')


def has_identity_branch(block: ReparamBlock) -> bool:
    """Whether a RepOpt-VGG block has (or stands for) an identity branch: same channels,
    stride 1."""
    return block.in_channels == block.out_channels and block.stride == 1


# --------------------------------------------------------------------------------------
# The two rules (pure tensor functions)


def repopt_kernel(kernel: Tensor, kernel_1x1: Tensor, scale: Tensor, scale_1x1: Tensor,
                  scale_identity: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """The one ``kxk`` kernel a CSLA block computes: ``s * W3 + t * W1 + w_id * I``.

    This is the *Rule of Initialization* of RepOpt-VGG (the plain kernel starts as the
    kernel of a freshly initialized CSLA block) and the map from a CSLA block to the plain
    one. Differentiable; follows the dtype and device of ``kernel``.

    Args:
        kernel (Tensor): ``(C_out, C_in / g, k, k)`` kernel ``W3``.
        kernel_1x1 (Tensor): ``(C_out, C_in / g, 1, 1)`` kernel ``W1`` (centred in ``kxk``).
        scale (Tensor): ``(C_out, )`` scale ``s`` of ``W3``.
        scale_1x1 (Tensor): ``(C_out, )`` scale ``t`` of ``W1``.
        scale_identity (Tensor, optional): ``(C_out, )`` factor ``w_id`` of the identity
            branch (needs ``C_in == C_out``); None for a block without identity.
        groups (int): Groups of the convolution. Defaults to 1.

    Returns:
        Tensor: The ``(C_out, C_in / g, k, k)`` kernel.
    """
    def per_out(vector: Tensor) -> Tensor:
        return vector.to(kernel).reshape(-1, 1, 1, 1)

    size = kernel.shape[-1]
    out = kernel * per_out(scale) + pad_kernel(kernel_1x1.to(kernel), size) * per_out(scale_1x1)
    if scale_identity is not None:
        ident = identity_kernel(kernel.shape[0], size, groups, dtype=kernel.dtype,
                                device=kernel.device)
        out = out + ident * per_out(scale_identity)
    return out


def repopt_grad_mult(scales: Mapping[str, Tensor], kernel_shape: Sequence[int],
                     groups: int = 1, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """The Grad Mult of a plain ``kxk`` kernel standing for a CSLA block (Rule of Iteration).

    A branch whose trainable kernel is scaled by a constant ``c`` moves the equivalent
    kernel by ``c * (-lr * c * grad)``, so the multiplier is the CSLA kernel of unit kernels
    with squared scales: ``s^2`` on every tap, ``+ t^2`` on the centre tap, ``+ 1`` on the
    identity taps (the identity's trainable factor is scaled by the constant 1). This is
    the paper's ``M`` (its Eq. 3) and the official ``RepOptVGGHandler`` with SGD.

    Args:
        scales (Mapping[str, Tensor]): ``'conv'``, ``'conv_1x1'`` and, for a block with an
            identity branch, ``'identity'`` (only its presence matters here).
        kernel_shape (Sequence[int]): ``(C_out, C_in / g, k, k)``.
        groups (int): Groups of the convolution. Defaults to 1.
        dtype (torch.dtype, optional): Result dtype; None for the default dtype.
        device (torch.device, optional): Result device.

    Returns:
        Tensor: The multiplier, shaped like the kernel (computed in float64).
    """
    c_out, c_in_g = kernel_shape[:2]
    ones = torch.ones(tuple(kernel_shape), dtype=torch.float64, device=device)
    ones_1x1 = torch.ones(c_out, c_in_g, 1, 1, dtype=torch.float64, device=device)
    has_identity = scales.get('identity') is not None
    mult = repopt_kernel(ones, ones_1x1, scales['conv'].double() ** 2,
                         scales['conv_1x1'].double() ** 2,
                         torch.ones(c_out, dtype=torch.float64) if has_identity else None,
                         groups)
    return mult.to(dtype or torch.get_default_dtype())


@torch.no_grad()
def init_plain_kernel(weight: Tensor, scales: Mapping[str, Tensor], groups: int = 1) -> None:
    """Set a plain kernel in place to a fresh CSLA block's: ``W <- s * W + t * W1 + w_id * I``.

    ``W`` is the kernel as initialized, ``W1`` a fresh ``1x1`` kernel with ``nn.Conv2d``'s
    default init (the official re-initialization).

    Args:
        weight (Tensor): The ``(C_out, C_in / g, k, k)`` kernel.
        scales (Mapping[str, Tensor]): The block's scales (:data:`SCALE_KEYS`).
        groups (int): Groups of the convolution. Defaults to 1.
    """
    fresh_1x1 = torch.empty(weight.shape[:2] + (1, 1), dtype=weight.dtype,
                            device=weight.device)
    nn.init.kaiming_uniform_(fresh_1x1, a=math.sqrt(5))  # nn.Conv2d's default
    weight.copy_(repopt_kernel(weight, fresh_1x1, scales['conv'], scales['conv_1x1'],
                               scales.get('identity'), groups))


# --------------------------------------------------------------------------------------
# Blocks


class ScaleLayer(nn.Module):
    """Per-channel scaling ``x * weight``: a CSLA branch's scale, trainable or constant.

    A constant scale is a buffer (it is in the state_dict, never in an optimizer), a
    trainable one a parameter; both are saved as ``weight`` (the official key).

    Args:
        num_features (int): Channels.
        init (float): Initial value. Defaults to 1.0.
        trainable (bool): Parameter (True) or buffer (False). Defaults to True.
    """

    def __init__(self, num_features: int, init: float = 1.0, trainable: bool = True):
        super().__init__()
        value = torch.full((num_features, ), float(init))
        if trainable:
            self.weight = nn.Parameter(value)
        else:
            self.register_buffer('weight', value)

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel."""
        return x * self.weight.reshape(1, -1, 1, 1)


@MODELS.register_module()
class CSLABlock(ReparamBlock):
    """RepOpt-VGG's CSLA block (the official ``LinearAddBlock``), the hyper-search block.

    ``BN(s * conv_kxk(x) + t * conv_1x1(x) [+ w_id * x]) -> act``, the identity term when
    ``in_channels == out_channels`` and ``stride == 1``. With ``trainable_scales=True`` this
    is the hyper-search (HS) block: ``s``, ``t`` and ``w_id`` train. With
    ``trainable_scales=False`` it is the CSLA block: ``s`` and ``t`` are constant buffers
    and ``w_id`` trains, as in the official ``is_csla=True``; trained with SGD it is
    equivalent to the plain ``conv -> BN`` with a RepOptimizer. Folds into one conv with
    bias (its BN included), like every block. See :class:`ReparamBlock` for the common
    arguments.

    Args:
        scale_init (float): Initial ``s`` and ``t``. Defaults to 1.0.
        trainable_scales (bool): Train ``s`` and ``t``. Defaults to True.
        use_se (bool): Must be False (RepOpt-VGG has no SE). Defaults to False.
    """

    _min_kernel_size = 3
    default_kernel_size = 3

    def __init__(self, *args, scale_init: float = 1.0, trainable_scales: bool = True,
                 use_se: bool = False, **kwargs):
        if use_se:
            raise ValueError('CSLABlock has no SE variant (RepOpt-VGG has none)')
        self.scale_init = scale_init
        self.trainable_scales = trainable_scales
        super().__init__(*args, **kwargs)

    def _build_branches(self) -> None:
        cin, cout, trainable = self.in_channels, self.out_channels, self.trainable_scales
        common = dict(stride=self.stride, groups=self.groups, bias=False)
        self.conv = nn.Conv2d(cin, cout, self.kernel_size, padding=self.padding,
                              dilation=self.dilation, **common)
        self.scale_conv = ScaleLayer(cout, self.scale_init, trainable)
        self.conv_1x1 = nn.Conv2d(cin, cout, 1, **common)
        self.scale_1x1 = ScaleLayer(cout, self.scale_init, trainable)
        # The identity factor trains in both forms (the official is_csla freezes only s, t).
        self.scale_identity = ScaleLayer(cout) if self.has_identity else None
        self.bn = build_bn(self.norm_cfg, cout)

    @property
    def has_identity(self) -> bool:
        """Whether the block has an identity branch (same channels, stride 1)."""
        return has_identity_branch(self)

    def _forward_branches(self, x: Tensor) -> Tensor:
        out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.scale_identity is not None:
            out = out + self.scale_identity(x)
        return self.bn(out)

    def _scale_layers(self) -> Dict[str, ScaleLayer]:
        """The scale of each branch, keyed as in :data:`SCALE_KEYS` (unfolded blocks only)."""
        if self.reparam_conv is not None:
            raise ValueError('the CSLA block is folded: it has no branches or scales left')
        layers = dict(conv=self.scale_conv, conv_1x1=self.scale_1x1)
        if self.scale_identity is not None:
            layers['identity'] = self.scale_identity
        return layers

    def merged_kernel(self) -> Tensor:
        """The plain kernel before the BN: :func:`repopt_kernel` of the branches."""
        scales = {key: layer.weight for key, layer in self._scale_layers().items()}
        return repopt_kernel(self.conv.weight, self.conv_1x1.weight, scales['conv'],
                             scales['conv_1x1'], scales.get('identity'), self.groups)

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The merged kernel with the BN folded in."""
        return fuse_bn(self.merged_kernel(), self.bn)

    def get_scales(self) -> Dict[str, Tensor]:
        """The current scales (detached copies), keyed as in :data:`SCALE_KEYS`."""
        return {key: layer.weight.detach().clone()
                for key, layer in self._scale_layers().items()}

    @torch.no_grad()
    def set_scales(self, scales: Mapping[str, Tensor]) -> None:
        """Set ``s``, ``t`` and, where the block has it, ``w_id`` (shapes are checked)."""
        for key, layer in self._scale_layers().items():
            layer.weight.copy_(scales[key].reshape(layer.weight.shape))

    def target_state_dict(self) -> Dict[str, Tensor]:
        """The state of the equivalent plain block (:class:`ConvBN`: ``conv``, ``bn``)."""
        state = {'conv.weight': self.merged_kernel().detach().clone()}
        state.update({f'bn.{key}': value.detach().clone()
                      for key, value in self.bn.state_dict().items()})
        return state


__all__ = ['SCALE_KEYS', 'has_identity_branch', 'repopt_kernel', 'repopt_grad_mult',
           'init_plain_kernel', 'ScaleLayer', 'CSLABlock']
