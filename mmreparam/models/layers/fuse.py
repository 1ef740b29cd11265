"""The fold math: pure tensor functions (kernel, bias in -> kernel, bias out).

Every function follows the dtype and device of its tensor inputs and is differentiable, so a
block's ``get_equivalent_kernel_bias()`` can be used in training code as well as at fold time.
Kernels use PyTorch's layout ``(out_channels, in_channels // groups, kh, kw)`` and PyTorch's
convolution, which is a cross-correlation.
"""
import math
from itertools import product
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import ExpansionError

KernelBias = Tuple[Tensor, Tensor]
Size2 = Union[int, Tuple[int, int]]


def _pair(size: Size2) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _scale_shift(mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor],
                 bias: Optional[Tensor]) -> KernelBias:
    """``(scale, shift)`` of the eval-mode BN map ``(y - mean) * weight / sqrt(var + eps) + bias``
    (``weight`` None: 1, ``bias`` None: 0): the one place this formula is written."""
    std = (var + eps).sqrt()
    scale = weight / std if weight is not None else 1.0 / std
    shift = bias if bias is not None else torch.zeros_like(std)
    return scale, shift - mean * scale


def bn_scale_shift(bn: _BatchNorm, bias: Optional[Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> KernelBias:
    """An eval-mode BatchNorm as a per-channel affine map: ``BN(y + bias) = y * scale + shift``.

    ``scale = gamma / std`` and ``shift = beta - (mean - bias) * scale`` with
    ``std = sqrt(running_var + eps)``; a non-affine BN has ``gamma = 1``, ``beta = 0``. Works
    for any ``_BatchNorm`` (BN, SyncBN, ...). Every fold of a BN computes this one formula
    (``_scale_shift``): here for a BN module, in :meth:`Affine.fold_into` for a branch's BN
    kept as its statistics.

    Args:
        bn (_BatchNorm): The BatchNorm.
        bias (Tensor, optional): A per-channel bias added before the BN (a convolution's).
            Defaults to None (zero).
        dtype (torch.dtype, optional): Compute in this dtype (e.g. float64 for a float32
            BN). Defaults to None: the BN's.

    Returns:
        tuple[Tensor, Tensor]: ``scale`` and ``shift``, ``(C,)``.

    Raises:
        ValueError: The BN keeps no running statistics (``track_running_stats=False``).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f'{type(bn).__name__} has no running statistics '
                         '(track_running_stats=False): it has no eval-mode function to fold')
    mean, var = bn.running_mean, bn.running_var
    weight, beta = (bn.weight, bn.bias) if bn.affine else (None, None)
    if dtype is not None:
        mean, var, weight, beta, bias = (None if t is None else t.to(dtype)
                                         for t in (mean, var, weight, beta, bias))
    if bias is not None:
        mean = mean - bias
    return _scale_shift(mean, var, bn.eps, weight, beta)


def fuse_bn(kernel: Tensor, bn: _BatchNorm, bias: Optional[Tensor] = None) -> KernelBias:
    """Fold an eval-mode BatchNorm that follows a convolution into its kernel and bias.

    ``BN(conv(x, kernel) + bias)`` equals ``conv(x, k') + b'`` with
    ``k' = kernel * gamma / std`` and ``b' = beta + (bias - mean) * gamma / std``
    (:func:`bn_scale_shift`). Works for any ``_BatchNorm`` (BN, SyncBN, ...), affine or not.
    Uses the running statistics, i.e. the eval-mode function of the BN.

    Args:
        kernel (Tensor): Convolution kernel, ``(C_out, C_in/g, kh, kw)``.
        bn (_BatchNorm): The BatchNorm over ``C_out`` channels.
        bias (Tensor, optional): Bias of the convolution. Defaults to None (zero).

    Returns:
        tuple[Tensor, Tensor]: The fused kernel and bias.
    """
    scale, shift = bn_scale_shift(bn, bias)
    return kernel * scale.to(kernel.dtype).reshape(-1, 1, 1, 1), shift.to(kernel.dtype)


def bn_pad_value(bn: _BatchNorm) -> Tensor:
    """The output of an eval-mode BatchNorm for a zero input: ``beta - mean * gamma / std``.

    Padding a BN's output with this value makes ``pad(BN(y))`` equal ``BN(pad(y))``, which
    keeps a 1x1 -> BN -> kxk chain foldable into one kxk convolution. It is the ``shift`` of
    :func:`bn_scale_shift`, so it equals the bias that :func:`fuse_bn` gives the 1x1.
    """
    return bn_scale_shift(bn)[1]


def pad_kernel(kernel: Tensor, size: Size2) -> Tensor:
    """Zero-pad a kernel symmetrically to a larger spatial ``size`` (centred).

    A ``1x1`` kernel becomes a ``kxk`` kernel with the weight at the centre; a ``1xk`` kernel
    becomes ``kxk`` with the weights on the middle row. The centred kernel computes the same
    function when the convolution's padding grows by the same amount.
    """
    kh, kw = kernel.shape[-2:]
    th, tw = _pair(size)
    dh, dw = th - kh, tw - kw
    if dh < 0 or dw < 0 or dh % 2 or dw % 2:
        raise ValueError(f'cannot centre a {kh}x{kw} kernel in {th}x{tw}: the target must be '
                         'at least as large and differ by an even number of taps per side')
    return F.pad(kernel, [dw // 2, dw // 2, dh // 2, dh // 2])


def identity_kernel(channels: int, kernel_size: Size2 = 1, groups: int = 1, *,
                    in_channels: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """The kernel of the identity map for a grouped convolution.

    Args:
        channels (int): Output channels.
        kernel_size (int | tuple): Spatial size; the 1 sits at the centre tap.
        groups (int): Groups.
        in_channels (int, optional): Input channels; None means ``channels`` (a true
            identity). With more outputs than inputs, output ``c`` copies in-group input
            ``c % (in_channels // groups)`` (OREPA's identity for its widened 1x1).

    Returns:
        Tensor: ``(channels, in_channels // groups, kh, kw)`` with a 1 at the centre tap of
        output channel ``c`` and in-group input channel ``c % (in_channels // groups)``.
    """
    kh, kw = _pair(kernel_size)
    in_channels = channels if in_channels is None else in_channels
    if channels % groups or in_channels % groups:
        raise ValueError(f'channels ({channels}, {in_channels}) must be divisible by groups '
                         f'({groups})')
    in_per_group = in_channels // groups
    kernel = torch.zeros(channels, in_per_group, kh, kw, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % in_per_group, kh // 2, kw // 2] = 1
    return kernel


def avg_kernel(channels: int, kernel_size: Size2, groups: int = 1, *,
               dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device] = None) -> Tensor:
    """The kernel of a ``kxk`` average pooling (``count_include_pad=True``) as a convolution.

    Returns:
        Tensor: ``(channels, channels // groups, kh, kw)``: ``1 / (kh * kw)`` at every tap
        of each channel's own input, zero elsewhere.
    """
    kh, kw = _pair(kernel_size)
    return identity_kernel(channels, 1, groups, dtype=dtype, device=device).expand(
        -1, -1, kh, kw) / (kh * kw)


def merge_1x1_kxk(kernel1: Tensor, bias1: Optional[Tensor], kernel2: Tensor,
                  bias2: Optional[Tensor], groups: int = 1) -> KernelBias:
    """Fold a ``1x1`` convolution followed by a ``kxk`` convolution into one ``kxk``.

    Exact when the intermediate feature map is padded with ``bias1`` (not zeros) before the
    ``kxk`` convolution, as DBB's BN-and-pad layer does; with zero bias it is always exact.

    Args:
        kernel1 (Tensor): ``(C_mid, C_in/g, 1, 1)`` (or ``(C_mid, C_in/g)``).
        bias1 (Tensor | None): ``(C_mid,)``.
        kernel2 (Tensor): ``(C_out, C_mid/g, k, k)``.
        bias2 (Tensor | None): ``(C_out,)``.
        groups (int): Groups shared by both convolutions. Defaults to 1.

    Returns:
        tuple[Tensor, Tensor]: ``(C_out, C_in/g, k, k)`` kernel and ``(C_out,)`` bias.
    """
    k1 = kernel1.reshape(kernel1.shape[0], kernel1.shape[1])
    c_mid, c_in_g = k1.shape
    c_out, c_mid_g, kh, kw = kernel2.shape
    if c_mid != c_mid_g * groups:
        raise ValueError(f'1x1 kernel gives {c_mid} channels but the kxk kernel takes '
                         f'{c_mid_g} x {groups} groups')
    # Per group: K[o, i, :, :] = sum_m K2[o, m, :, :] * K1[m, i].
    k1_g = k1.reshape(groups, c_mid // groups, c_in_g)
    k2_g = kernel2.reshape(groups, c_out // groups, c_mid_g, kh * kw)
    kernel = torch.einsum('gmi,gomk->goik', k1_g, k2_g).reshape(c_out, c_in_g, kh, kw)
    bias = torch.zeros(c_out, dtype=kernel2.dtype, device=kernel2.device)
    if bias1 is not None:
        b1_g = bias1.reshape(groups, 1, c_mid_g, 1)
        bias = bias + (k2_g * b1_g).sum(dim=(2, 3)).reshape(c_out)
    if bias2 is not None:
        bias = bias + bias2
    return kernel, bias


def merge_1x1_depthwise(kernel1: Tensor, bias1: Optional[Tensor], dw_kernel: Tensor,
                        dw_bias: Optional[Tensor]) -> KernelBias:
    """Fold a (grouped) ``1x1`` convolution followed by a per-channel ``kxk`` kernel.

    Exact under the same padding condition as :func:`merge_1x1_kxk`.

    Args:
        kernel1 (Tensor): ``(C, C_in/g, 1, 1)``.
        bias1 (Tensor | None): ``(C,)``.
        dw_kernel (Tensor): ``(C, 1, k, k)``, one kernel per channel.
        dw_bias (Tensor | None): ``(C,)``.

    Returns:
        tuple[Tensor, Tensor]: ``(C, C_in/g, k, k)`` kernel and ``(C,)`` bias.
    """
    kernel = kernel1 * dw_kernel
    bias = torch.zeros(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    if bias1 is not None:
        bias = bias + bias1 * dw_kernel.sum(dim=(1, 2, 3))
    if dw_bias is not None:
        bias = bias + dw_bias
    return kernel, bias


def dw_pw_to_full(dw_kernel: Tensor, pw_kernel: Tensor, in_channels: int,
                  groups: int = 1) -> Tensor:
    """Fold a depthwise ``kxk`` convolution followed by a pointwise ``1x1`` into one kernel.

    The depthwise convolution has ``groups = C_in`` and a channel multiplier ``m``
    (``C_in * m`` output channels, ``m`` consecutive filters per input channel); the pointwise
    convolution maps those ``C_in * m`` channels to ``C_out`` with ``groups``.

    Args:
        dw_kernel (Tensor): ``(C_in * m, 1, k, k)``.
        pw_kernel (Tensor): ``(C_out, C_in * m / g, 1, 1)``.
        in_channels (int): ``C_in``.
        groups (int): Groups of the pointwise (and of the result). Defaults to 1.

    Returns:
        Tensor: ``(C_out, C_in / g, k, k)``.
    """
    c_dw, _, kh, kw = dw_kernel.shape
    c_out = pw_kernel.shape[0]
    if c_dw % in_channels or pw_kernel.shape[1] * groups != c_dw:
        raise ValueError(f'depthwise kernel with {c_dw} channels and pointwise kernel taking '
                         f'{pw_kernel.shape[1]} x {groups} groups do not fit {in_channels} '
                         'input channels')
    multiplier = c_dw // in_channels
    c_in_g = in_channels // groups
    dw = dw_kernel.reshape(groups, c_in_g, multiplier, kh * kw)
    pw = pw_kernel.reshape(groups, c_out // groups, c_in_g, multiplier)
    return torch.einsum('gimk,goim->goik', dw, pw).reshape(c_out, c_in_g, kh, kw)


def compose_kernels(first: Tensor, second: Tensor) -> Tensor:
    """The kernel of two stacked stride-1 convolutions: ``conv(conv(x, first), second)``.

    For cross-correlations ``y = x * A`` then ``z = y * B``, the composed kernel is the full
    2-D convolution ``C[w] = sum_{u + v = w} A[u] B[v]`` summed over the middle channels; it
    has size ``ka + kb - 1``. It equals the stacked pair exactly away from the borders (the
    stacked pair pads twice), which is how OREPA's large-kernel generator defines its kernel.

    Args:
        first (Tensor): ``(C_mid, C_in, ka, ka)``.
        second (Tensor): ``(C_out, C_mid, kb, kb)``.

    Returns:
        Tensor: ``(C_out, C_in, ka + kb - 1, ka + kb - 1)``.
    """
    if first.shape[0] != second.shape[1]:
        raise ValueError(f'first kernel gives {first.shape[0]} channels, second takes '
                         f'{second.shape[1]} (groups are not supported here)')
    kbh, kbw = second.shape[-2:]
    # Batch over input channels: input (C_in, C_mid, ka, ka); a full convolution is a
    # correlation with the flipped kernel and padding kb - 1.
    out = F.conv2d(first.transpose(0, 1), second.flip(-2, -1), padding=(kbh - 1, kbw - 1))
    return out.transpose(0, 1)


def frequency_prior(channels: int, kernel_size: int, *, dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """OREPA's frequency prior: one 1-D DCT-II basis function per output channel.

    The first half of the channels vary along the rows, the second half along the columns:
    ``cos(pi * (h + 0.5) * (c + 1) / k)``. For ``k = 3`` this is the official definition; the
    official code leaves other sizes uninitialised, here ``k`` is the kernel size for all.

    Returns:
        Tensor: ``(channels, k, k)``.
    """
    half = channels / 2
    c = torch.arange(channels, dtype=torch.float64, device=device).reshape(-1, 1, 1)
    pos = torch.arange(kernel_size, dtype=torch.float64, device=device) + 0.5
    rows = pos.reshape(1, -1, 1).expand(channels, kernel_size, kernel_size)
    cols = pos.reshape(1, 1, -1).expand(channels, kernel_size, kernel_size)
    first_half = c < half
    freq = torch.where(first_half, c + 1, c + 1 - half)
    coord = torch.where(first_half, rows, cols)
    prior = torch.cos(math.pi * coord * freq / kernel_size)  # float64
    return prior.to(dtype or torch.get_default_dtype())


def fuse_preceding_bn(weight: Tensor, bias: Optional[Tensor], bn: _BatchNorm) -> KernelBias:
    """Fold an eval-mode BatchNorm that *precedes* a linear layer into that layer.

    ``fc(BN(x))`` equals ``fc'(x)`` with ``W' = W * scale`` (per input) and
    ``b' = b + W @ shift``, where ``BN(x) = x * scale + shift`` channel by channel. The layer
    may read each BN channel ``r`` times in a row (channel-major flattening, as when a
    ``(C, hp, wp)`` map is flattened into ``C * hp * wp`` features).

    Args:
        weight (Tensor): ``(out, C * r)`` (``nn.Linear``) or ``(out, C * r, 1, 1)`` (a
            ``1x1`` convolution; larger kernels are refused, their zero padding would not
            see the BN's shift).
        bias (Tensor | None): ``(out,)``.
        bn (_BatchNorm): The BatchNorm over ``C`` channels.

    Returns:
        tuple[Tensor, Tensor]: The fused weight (same shape) and bias ``(out,)``.
    """
    if any(s != 1 for s in weight.shape[2:]):
        raise ValueError('fuse_preceding_bn folds into a linear layer or a 1x1 convolution; '
                         f'got a weight of shape {tuple(weight.shape)}')
    scale, shift = bn_scale_shift(bn)
    in_features, channels = weight.shape[1], bn.num_features
    if in_features % channels:
        raise ValueError(f'{in_features} input features cannot be split over {channels} BN '
                         'channels')
    repeats = in_features // channels
    scale = scale.to(weight.dtype).repeat_interleave(repeats)
    shift = shift.to(weight.dtype).repeat_interleave(repeats)
    matrix = weight.reshape(weight.shape[0], in_features)
    fused_bias = matrix @ shift
    if bias is not None:
        fused_bias = fused_bias + bias
    view = (1, -1) + (1, ) * (weight.dim() - 2)
    return weight * scale.reshape(view), fused_bias


def conv_to_fc(kernel: Tensor, bias: Optional[Tensor], input_size: Size2,
               groups: int = 1) -> KernelBias:
    """The fully-connected layer equal to a convolution on a fixed-size input.

    RepMLP's *Locality Injection*: a stride-1 convolution with "same" zero padding
    (``k // 2`` per side) on an ``h x w`` map is a linear map of the flattened map; this
    returns its matrix. Features are flattened channel-major, ``(c, y, x)``, so with
    ``groups`` the matrix is the weight of a grouped ``1x1`` convolution over
    ``C * h * w`` channels (``reshape(-1, C_in / g * h * w, 1, 1)``). Found by convolving the
    identity basis, so it is exact in any dtype and differentiable in ``kernel``.

    Args:
        kernel (Tensor): ``(C_out, C_in / g, kh, kw)`` with odd ``kh`` and ``kw``.
        bias (Tensor | None): ``(C_out,)``.
        input_size (int | tuple): ``(h, w)`` of the input map.
        groups (int): Groups of the convolution. Defaults to 1.

    Returns:
        tuple[Tensor, Tensor]: ``(C_out * h * w, C_in / g * h * w)`` weight and
        ``(C_out * h * w,)`` bias.
    """
    h, w = _pair(input_size)
    c_out, c_in_g, kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'conv_to_fc needs odd kernel sizes for "same" padding, got {kh}x{kw}')
    if c_out % groups:
        raise ValueError(f'{c_out} output channels cannot be split into {groups} groups')
    features = c_in_g * h * w
    basis = torch.eye(features, dtype=kernel.dtype, device=kernel.device)
    basis = basis.reshape(features, c_in_g, h, w).repeat(1, groups, 1, 1)
    # Row j of the output is the response of every output to in-group input feature j.
    response = F.conv2d(basis, kernel, padding=(kh // 2, kw // 2), groups=groups)
    weight = response.reshape(features, c_out * h * w).t()
    if bias is None:
        bias = torch.zeros(c_out, dtype=kernel.dtype, device=kernel.device)
    return weight, bias.repeat_interleave(h * w)


# --------------------------------------------------------------------------------------
# The inverse direction: a kernel and affine map -> the state of a train-time block


class Affine(NamedTuple):
    """The eval-mode affine map that follows a kernel: a BatchNorm's, or only a bias.

    ``weight is None`` means the map is ``y + bias``; otherwise it is the eval-mode BN
    ``(y - mean) * weight / sqrt(var + eps) + bias``.
    """
    bias: Tensor
    weight: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    eps: float = 0.0

    @classmethod
    def of(cls, bn: _BatchNorm) -> 'Affine':
        """The eval-mode map of ``bn`` (a non-affine BN has weight 1 and bias 0)."""
        ones = torch.ones_like(bn.running_mean)
        return cls(bn.bias if bn.affine else torch.zeros_like(ones),
                   bn.weight if bn.affine else ones, bn.running_mean, bn.running_var, bn.eps)

    def fold_into(self, kernel: Tensor) -> KernelBias:
        """The kernel and bias of one biased conv computing ``affine(conv(x, kernel))``."""
        if self.weight is None:
            return kernel, self.bias
        scale, shift = _scale_shift(self.mean, self.var, self.eps, self.weight, self.bias)
        return kernel * scale.reshape(-1, 1, 1, 1), shift


def shift_running_var(var: Tensor, source_eps: float, eps: float) -> Tensor:
    """``running_var`` for a BN with ``eps`` that keeps ``running_var + eps`` unchanged."""
    if source_eps == eps:
        return var
    shifted = var + (source_eps - eps)
    if (shifted <= 0).any():
        raise ExpansionError(f'the BatchNorm eps {eps} is too large for a running_var '
                             f'estimated with eps {source_eps}')
    return shifted


def bn_state(affine: Affine, bn: _BatchNorm) -> Dict[str, Tensor]:
    """The state of ``bn`` (with its own eps) computing ``affine`` in eval mode (float64)."""
    if not bn.affine:
        raise ExpansionError(f'cannot set a non-affine {type(bn).__name__} to an arbitrary '
                             'affine map')
    if affine.weight is None:  # a bias only: unit scale (gamma / std == 1 exactly)
        var = torch.ones_like(affine.bias)
        state = dict(weight=(var + bn.eps).sqrt(), bias=affine.bias,
                     running_mean=torch.zeros_like(var), running_var=var)
    else:
        state = dict(weight=affine.weight, bias=affine.bias, running_mean=affine.mean,
                     running_var=shift_running_var(affine.var, affine.eps, bn.eps))
    return {key: value.to(torch.float64) for key, value in state.items()}


def zero_bn_state(bn: _BatchNorm) -> Dict[str, Tensor]:
    """The state of ``bn`` that outputs exactly zero in eval mode (weight 0, bias 0): how
    the expansion switches a branch off."""
    zeros = torch.zeros_like(bn.running_mean, dtype=torch.float64)
    state = dict(running_mean=zeros, running_var=torch.ones_like(zeros))
    if bn.affine:
        state.update(weight=zeros.clone(), bias=zeros.clone())
    return state


def _orthogonal(size: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _split_shift(shift: int, parts: int) -> List[int]:
    """Write ``shift`` as a sum of ``parts`` 3x3 tap offsets (each 0, 1 or 2)."""
    offsets = []
    for _ in range(parts):
        offsets.append(min(2, shift))
        shift -= offsets[-1]
    return offsets


#: Largest relative residual accepted when solving for stacked 3x3 factors.
FACTOR_TOLERANCE = 1e-9


def factor_into_3x3(kernel: Tensor, num_factors: int, mid_channels: int) -> List[Tensor]:
    """``num_factors`` 3x3 kernels whose stacked composition is the ``kxk`` ``kernel``.

    The inverse of composing OREPA's large-kernel generators: factor ``i > 0`` enters the
    composition flipped, ``compose(f0, f1.flip(), f2.flip(), ...) == kernel`` (float64).
    The first ``L - 1`` factors are fixed: channel ``m`` of their composition is input
    channel ``c`` shifted to position ``p`` of a grid whose ``3x3`` windows cover ``kxk``,
    mixed by seeded orthogonal matrices so that no channel is zero. The last factor is the
    least-squares solution, exact because those shifted responses span every ``kxk`` kernel;
    checked against :data:`FACTOR_TOLERANCE`.

    Args:
        kernel (Tensor): ``(C_out, C_in, k, k)`` with ``k == 2 * num_factors + 1``.
        num_factors (int): Number of 3x3 factors (at least 2).
        mid_channels (int): Channels between the factors.

    Returns:
        list[Tensor]: The float64 factors, ``(mid, C_in, 3, 3)``, ``(mid, mid, 3, 3)``...,
        ``(C_out, mid, 3, 3)``.

    Raises:
        ExpansionError: ``mid_channels`` is too narrow for the kernel, or the solution is
            not exact.
    """
    cout, cin, k = kernel.shape[0], kernel.shape[1], kernel.shape[-1]
    if k != 2 * num_factors + 1 or num_factors < 2:
        raise ValueError(f'a {k}x{k} kernel is not a composition of {num_factors} 3x3 kernels')
    if not bool(torch.isfinite(kernel).all()):  # lstsq would fail inside, or pass inf / NaN
        raise ExpansionError(f'cannot factor a {k}x{k} kernel with NaN or Inf values into '
                             '3x3 kernels')
    kernel = kernel.detach().to('cpu', torch.float64)
    count = math.ceil(k / 3)
    positions = sorted({round(i * (k - 3) / (count - 1)) for i in range(count)})
    if cin * len(positions)**2 > mid_channels:
        raise ExpansionError(
            f'cannot factor a {k}x{k} kernel on {cin} input channels into 3x3 kernels with '
            f'{mid_channels} internal channels (needs at least {cin * len(positions)**2})')
    mid = mid_channels
    fixed = [torch.zeros(mid, cin if i == 0 else mid, 3, 3, dtype=torch.float64)
             for i in range(num_factors - 1)]
    for m, (c, row, col) in enumerate(product(range(cin), positions, positions)):
        rows, cols = _split_shift(row, num_factors - 1), _split_shift(col, num_factors - 1)
        fixed[0][m, c, rows[0], cols[0]] = 1
        for i in range(1, num_factors - 1):  # later factors enter the composition flipped
            fixed[i][m, m, 2 - rows[i], 2 - cols[i]] = 1
    mixing = [_orthogonal(mid, seed) for seed in range(num_factors - 1)]
    fixed[0] = torch.einsum('pm,mihw->pihw', mixing[0], fixed[0])
    for i in range(1, num_factors - 1):
        fixed[i] = torch.einsum('pm,mjhw,qj->pqhw', mixing[i], fixed[i], mixing[i - 1])
    partial = fixed[0]
    for factor in fixed[1:]:
        partial = compose_kernels(partial, factor.flip(-2, -1))
    # The composition is linear in the last factor: one column per entry of it.
    basis = torch.eye(mid * 9, dtype=torch.float64).reshape(mid * 9, mid, 3, 3)
    system = compose_kernels(partial, basis.flip(-2, -1)).reshape(mid * 9, -1).T
    target = kernel.reshape(cout, -1).T
    solution = torch.linalg.lstsq(system, target, driver='gelsd').solution
    residual = (system @ solution - target).abs().max() / target.abs().max().clamp_min(1e-300)
    if not (residual <= FACTOR_TOLERANCE and bool(torch.isfinite(solution).all())):
        raise ExpansionError(f'could not factor the {k}x{k} kernel into 3x3 kernels '
                             f'(relative residual {residual:.2e})')
    return fixed + [solution.T.reshape(cout, mid, 3, 3)]
