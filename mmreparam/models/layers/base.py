"""The protocol shared by every re-parameterizable block."""
from typing import Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...utils import ConfigType, OptConfigType


def build_bn(norm_cfg: ConfigType, num_features: int) -> _BatchNorm:
    """Build a norm layer from ``norm_cfg`` and check that it is a foldable BatchNorm.

    Any ``_BatchNorm`` subclass is accepted (BN, SyncBN, ...): its eval-mode function is
    affine, which is what folding needs. GroupNorm, LayerNorm and the like are not.
    """
    norm = build_norm_layer(norm_cfg, num_features)[1]
    if not isinstance(norm, _BatchNorm):
        raise TypeError(f're-parameterizable blocks need a BatchNorm (any _BatchNorm such as '
                        f'BN or SyncBN); norm_cfg={dict(norm_cfg)} builds '
                        f'{type(norm).__name__}')
    return norm


class ReparamBlock(BaseModule):
    """Base class of the blocks that fold into one convolution with bias.

    Subclasses build their training-time branches in ``__init__`` (when ``deploy=False``)
    and implement :meth:`get_equivalent_kernel_bias` and :meth:`_forward_branches`. The base
    class gives them the common protocol:

    - ``deploy=True`` builds exactly the folded structure: ``reparam_conv`` (a conv with bias)
      plus the kept parts (activation, SE);
    - :meth:`fold` replaces the branches by ``reparam_conv``; it is idempotent, and the
      state_dict of a folded block loads strictly into a ``deploy=True`` block.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Size of the (square) kernel.
        stride (int): Stride. Defaults to 1.
        padding (int, optional): Zero padding; None gives ``dilation * (kernel_size // 2)``.
            Defaults to None.
        dilation (int): Dilation. Defaults to 1.
        groups (int): Groups. Defaults to 1.
        norm_cfg (dict): Config of the BatchNorm layers. Defaults to ``dict(type='BN')``.
        act_cfg (dict, optional): Activation after the block; None for none. Defaults to None.
        deploy (bool): Build the folded structure. Defaults to False.
        init_cfg (dict, optional): mmengine initialization config. Defaults to None.
    """

    #: Children that survive a fold (they are not part of the linear branches).
    _kept_on_fold: Tuple[str, ...] = ('act', 'se')
    #: Whether the block needs ``padding == dilation * (kernel_size // 2)``.
    _needs_same_padding = True
    #: Whether the block supports ``groups > 1``.
    _supports_groups = True

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: int,
                 stride: int = 1,
                 padding: Optional[int] = None,
                 dilation: int = 1,
                 groups: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = None,
                 deploy: bool = False,
                 init_cfg: OptConfigType = None):
        super().__init__(init_cfg)
        for name, value in dict(in_channels=in_channels, out_channels=out_channels,
                                kernel_size=kernel_size, stride=stride, dilation=dilation,
                                groups=groups).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{type(self).__name__}: {name} must be a positive int, '
                                 f'got {value!r}')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'{type(self).__name__}: in_channels ({in_channels}) and '
                             f'out_channels ({out_channels}) must be divisible by groups '
                             f'({groups})')
        if groups > 1 and not self._supports_groups:
            raise ValueError(f'{type(self).__name__} does not support groups > 1 '
                             f'(got groups={groups})')
        same = dilation * (kernel_size // 2)
        padding = same if padding is None else padding
        if self._needs_same_padding and (kernel_size % 2 == 0 or padding != same):
            raise ValueError(
                f'{type(self).__name__} needs an odd kernel_size and padding == '
                f'dilation * (kernel_size // 2) = {same} so its branches align; got '
                f'kernel_size={kernel_size}, padding={padding}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.deploy = deploy
        self.se: Optional[nn.Module] = None
        self.act = build_activation_layer(act_cfg) if act_cfg else nn.Identity()
        self.reparam_conv: Optional[nn.Conv2d] = self._new_reparam_conv() if deploy else None

    def _new_reparam_conv(self, device=None, dtype=None) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=True,
                         device=device, dtype=dtype)

    def _forward_branches(self, x: Tensor) -> Tensor:
        """Training-time forward of the linear part (before SE and activation)."""
        raise NotImplementedError

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """Return the kernel and bias of the one convolution equal to the linear part.

        Differentiable (gradients reach every branch parameter) and computed from the
        eval-mode function of the BatchNorms (running statistics).
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Run the block: the folded conv if folded, else the branches; then SE and act."""
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self._forward_branches(x)
        if self.se is not None:
            out = self.se(out)
        return self.act(out)

    @property
    def folded(self) -> bool:
        """Whether the block is in its deploy form (``reparam_conv`` only)."""
        return self.reparam_conv is not None

    def fold(self) -> 'ReparamBlock':
        """Replace the branches by one convolution with bias, in place.

        Idempotent: a folded or ``deploy=True`` block is returned unchanged. Works under
        ``torch.no_grad`` and ``torch.inference_mode``; the new parameters are ordinary
        tensors either way, so a folded model can still be trained.

        Returns:
            ReparamBlock: ``self``.
        """
        if self.reparam_conv is not None:
            return self
        with torch.inference_mode(False), torch.no_grad():
            kernel, bias = self.get_equivalent_kernel_bias()
            conv = self._new_reparam_conv(device=kernel.device, dtype=kernel.dtype)
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        for name in list(self._modules):
            if name not in self._kept_on_fold:
                delattr(self, name)
        for name in list(self._parameters) + list(self._buffers):
            delattr(self, name)
        self.reparam_conv = conv
        self.deploy = True
        return self

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, folded={self.reparam_conv is not None}')


#: Methods by which other libraries fold a module in place: mmpretrain (RepVGG, MobileOne,
#: RepLKNet, ...) and mmyolo use ``switch_to_deploy``; timm uses ``reparameterize``.
FOREIGN_FOLD_METHODS = ('switch_to_deploy', 'reparameterize')


@runtime_checkable
class Foldable(Protocol):
    """The fold protocol of mmreparam's self-folding modules (:func:`fold_tree` uses it).

    ``fold()`` turns the module into its deploy form in place and returns it; it is
    idempotent, and the training-time branches go away with it, so nothing inside a
    foldable module is walked. ``folded`` says whether the module is in its deploy form
    (built with ``deploy=True`` or already folded). :class:`ReparamBlock` and
    :class:`~mmreparam.models.layers.RepMLPBlock` follow it.
    """

    @property
    def folded(self) -> bool:
        """Whether the module is in its deploy form."""

    def fold(self) -> nn.Module:
        """Fold in place; a no-op when already folded. Returns the module."""


def _is_mmreparam(module: nn.Module) -> bool:
    """Whether the module's class or one of its bases is defined in mmreparam."""
    return any(cls.__module__.startswith('mmreparam.') for cls in type(module).__mro__)


def fold_tree(module: nn.Module) -> int:
    """Fold ``module`` and everything in it, top-down; return how many modules were folded.

    An mmreparam module that follows the :class:`Foldable` protocol (every
    :class:`ReparamBlock`, :class:`~mmreparam.models.layers.RepMLPBlock`) folds itself (its
    branches go away with it); another module with ``switch_to_deploy()`` or
    ``reparameterize()`` is asked to fold itself, then its children are walked too, since a
    foreign container may hold blocks it does not know.
    """
    if _is_mmreparam(module) and isinstance(module, Foldable):
        already = module.folded
        module.fold()
        return 0 if already else 1
    if not type(module).__module__.startswith('mmreparam.'):  # ours hold Foldables
        for method in FOREIGN_FOLD_METHODS:
            fn = getattr(module, method, None)
            if callable(fn):
                fn()
                return 1 + fold_children(module)
    return fold_children(module)


def fold_children(module: nn.Module) -> int:
    """:func:`fold_tree` on each child of ``module``; return how many were folded."""
    return sum(fold_tree(child) for child in module.children())
