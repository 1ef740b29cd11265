"""The protocol shared by every re-parameterizable block."""
import copy
from abc import ABC, abstractmethod
from typing import Callable, Dict, Iterable, Optional, Tuple, Type

import torch
import torch.nn as nn
from mmcv.cnn import build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import ExpansionError
from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from .fuse import Affine, bn_state, zero_bn_state


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


def float64_state(module: nn.Module) -> Dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state_dict, floating tensors in float64."""
    state = {}
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        state[key] = value.to(torch.float64) if value.is_floating_point() else value.clone()
    return state


def put(state: Dict[str, Tensor], prefix: str, values: Dict[str, Tensor]) -> None:
    """Write ``values`` into ``state`` under ``prefix`` (``'bn.'`` ...)."""
    state.update({prefix + key: value for key, value in values.items()})


def put_bn(state: Dict[str, Tensor], prefix: str, bn: _BatchNorm,
           affine: Optional[Affine] = None) -> None:
    """Set the BN at ``prefix`` in ``state`` to ``affine``; None switches it off (it outputs
    zero in eval mode)."""
    put(state, prefix, zero_bn_state(bn) if affine is None else bn_state(affine, bn))


def replace_branches(module: nn.Module, name: str, equivalent: Callable[[], Tuple[Tensor, Tensor]],
                     build: Callable[..., nn.Module], *, delete: Iterable[str] = (),
                     clear: Iterable[str] = ()) -> None:
    """The fold's module surgery: put one layer holding the branches' equivalent weight and
    bias in the place of the training-time branches, in place.

    ``build(device=, dtype=)`` makes the layer (a conv or linear layer with bias) on the
    device and dtype of ``equivalent()``'s weight; the weight and bias are copied into it
    outside inference mode and without autograd, so that a fold works under
    ``torch.no_grad`` and ``torch.inference_mode`` and the new parameters are ordinary
    tensors (a folded model can still be trained). Then the attributes ``delete`` are
    deleted, the layer is set as ``name`` and the attributes ``clear`` are set to None.

    Args:
        module (nn.Module): The block being folded.
        name (str): The attribute that holds the new layer.
        equivalent (callable): Returns the layer's weight and bias (read before anything is
            removed).
        build (callable): Makes the layer, given ``device`` and ``dtype``.
        delete (Iterable[str]): Attributes (branches, parameters, buffers) to delete.
        clear (Iterable[str]): Attributes to set to None after the new layer is in place.
    """
    with torch.inference_mode(False), torch.no_grad():
        weight, bias = equivalent()
        layer = build(device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    for attr in list(delete):
        delattr(module, attr)
    setattr(module, name, layer)
    for attr in clear:
        setattr(module, attr, None)


#: The default of ``act_cfg``: the block class's :attr:`ReparamBlock.default_act_cfg`.
DEFAULT_ACT = dict(type='default')

def registered_block_types() -> Tuple[Type['ReparamBlock'], ...]:
    """Every :class:`ReparamBlock` subclass registered in mmreparam's ``MODELS`` (its
    ``@MODELS.register_module()``), in registration order.

    This is the one list of block types: the ``reparam=`` names
    (:data:`~mmreparam.models.layers.factory.REPARAM_TYPES`), the per-kernel-size choice,
    checkpoint recognition and conversion all read it and the classes' own declarations
    (:attr:`~ReparamBlock.reparam_names`, :attr:`~ReparamBlock.chosen_kernel_sizes`,
    :attr:`~ReparamBlock.state_markers`, :meth:`~ReparamBlock.replacement_problem`).
    """
    found = []
    for cls in MODELS.module_dict.values():
        if isinstance(cls, type) and issubclass(cls, ReparamBlock) and cls not in found:
            found.append(cls)
    return tuple(found)


def block_types() -> Tuple[Type['ReparamBlock'], ...]:
    """The registered block types that declare :attr:`~ReparamBlock.state_markers` of their
    own, in registration order (every train-time block a state_dict can be recognised as)."""
    return tuple(cls for cls in registered_block_types() if cls.__dict__.get('state_markers'))


def block_type_of_state(keys) -> Optional[Type['ReparamBlock']]:
    """The train-time block type whose :attr:`~ReparamBlock.state_markers` are all in
    ``keys`` (a block's state_dict keys); the most specific one when several match, None
    when none does. Raises ValueError when two equally specific types match."""
    keys = set(keys)
    found = [cls for cls in block_types() if set(cls.state_markers) <= keys]
    if not found:
        return None
    best = max(len(cls.state_markers) for cls in found)
    found = [cls for cls in found if len(cls.state_markers) == best]
    if len(found) > 1:
        raise ValueError(f'block state matches {[cls.__name__ for cls in found]} equally: '
                         'their state_markers must tell them apart')
    return found[0]


class Foldable(ABC):
    """The fold protocol of mmreparam's self-folding modules (:func:`~.foreign.fold_module`
    folds what follows it).

    ``fold()`` turns the module into its deploy form in place and returns it; it is
    idempotent, and the training-time branches go away with it, so nothing inside a
    foldable module is walked. ``folded`` says whether the module is in its deploy form
    (built with ``deploy=True`` or already folded). A module follows the protocol by
    deriving from this class (:class:`ReparamBlock`,
    :class:`~mmreparam.models.layers.RepMLPBlock`), so ``isinstance(module, Foldable)``
    tells mmreparam's blocks from another library's module that has methods of the same
    names.
    """

    @property
    @abstractmethod
    def folded(self) -> bool:
        """Whether the module is in its deploy form."""

    @abstractmethod
    def fold(self) -> nn.Module:
        """Fold in place; a no-op when already folded. Returns the module."""


class ReparamBlock(BaseModule, Foldable):
    """Base class of the blocks that fold into one convolution with bias.

    Subclasses build their training-time branches in :meth:`_build_branches` (called by
    this constructor when ``deploy=False``; a block with arguments of its own takes them
    keyword-only in a short ``__init__`` that stores them and calls this one), implement
    :meth:`get_equivalent_kernel_bias`, :meth:`_forward_branches` and
    :meth:`_expand_branches`, and name the keys that identify them in
    :attr:`state_markers`. The base class gives them the common protocol, both directions:

    - ``deploy=True`` builds exactly the folded structure: ``reparam_conv`` (a conv with bias)
      plus the kept parts (activation, SE);
    - :meth:`fold` replaces the branches by ``reparam_conv``; it is idempotent, and the
      state_dict of a folded block loads strictly into a ``deploy=True`` block;
    - :meth:`kernel_and_affine` reduces the linear part to one kernel and an affine map, and
      :meth:`expansion_state` is its inverse: the state with which this block computes a
      given kernel and affine map (the checkpoint converter and :func:`mmreparam.expand` are
      written over these two methods only).

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int, optional): Size of the (square) kernel; None gives the block's
            :attr:`default_kernel_size`. Defaults to None.
        stride (int): Stride. Defaults to 1.
        padding (int, optional): Zero padding; None gives ``dilation * (kernel_size // 2)``.
            Defaults to None.
        dilation (int): Dilation. Defaults to 1.
        groups (int): Groups. Defaults to 1.
        norm_cfg (dict): Config of the BatchNorm layers. Defaults to ``dict(type='BN')``.
        act_cfg (dict, optional): Activation after the block; None for none. Defaults to the
            block's :attr:`default_act_cfg` (None but for the RepVGG blocks: ReLU).
        deploy (bool): Build the folded structure. Defaults to False.
        init_cfg (dict, optional): mmengine initialization config. Defaults to None.
    """

    #: Children that survive a fold (they are not part of the linear branches).
    _kept_on_fold: Tuple[str, ...] = ('act', 'se')
    #: Whether the block needs ``padding == dilation * (kernel_size // 2)``.
    _needs_same_padding = True
    #: Whether the block supports ``groups > 1``.
    _supports_groups = True
    #: Smallest kernel size the block's branches need.
    _min_kernel_size = 1
    #: ``kernel_size`` when none is given (None: it must be given).
    default_kernel_size: Optional[int] = None
    #: ``act_cfg`` when none is given.
    default_act_cfg: OptConfigType = None
    #: tuple[str, ...]: Keys of the block's state_dict that identify its train-time form
    #: (empty: the type is never recognised from a state_dict). Read from the class itself,
    #: not inherited.
    state_markers: Tuple[str, ...] = ()
    #: tuple[str, ...]: The ``reparam=`` values that put this block on convolutions
    #: (``('DBB', )``), read from the class itself, not inherited. Several types may share
    #: a name, each for its own kernel sizes (OREPA, OREPA1x1, OREPALargeConv); the first
    #: registered is the name's main type (``REPARAM_TYPES[name]``), the one that takes the
    #: block arguments of a ``reparam`` dict. Empty: no ``reparam=`` value chooses it (a
    #: block that only a backbone builds, such as CSLABlock).
    reparam_names: Tuple[str, ...] = ()
    #: tuple[int, int | None]: The ``kxk`` convolutions a ``reparam=`` name of
    #: :attr:`reparam_names` gives this block, ``(smallest k, largest k or None for no
    #: limit)``. The default, ``1 < k < 7``, is the official rule of ACB, DBB and RepVGG;
    #: convolutions no type of the name takes stay plain (:class:`ConvBN`). Grouped ones
    #: also need :attr:`_supports_groups`.
    chosen_kernel_sizes: Tuple[int, Optional[int]] = (2, 6)

    @classmethod
    def chosen_for(cls, kernel_size: int, groups: int = 1) -> bool:
        """Whether a ``reparam=`` name of :attr:`reparam_names` puts this block on a
        ``kernel_size x kernel_size`` convolution with ``groups`` (:attr:`chosen_kernel_sizes`
        and :attr:`_supports_groups`)."""
        smallest, largest = cls.chosen_kernel_sizes
        return (smallest <= kernel_size and (largest is None or kernel_size <= largest)
                and (groups == 1 or cls._supports_groups))

    @classmethod
    def describe_choice(cls) -> str:
        """:meth:`chosen_for` in words (``'1 < k < 7'``, ``'k = 1 and groups=1'``)."""
        smallest, largest = cls.chosen_kernel_sizes
        if smallest == largest:
            text = f'k = {smallest}'
        elif largest is None:
            text = f'k >= {smallest}'
        else:
            text = f'{smallest - 1} < k < {largest + 1}'
        return text if cls._supports_groups else f'{text} and groups=1'

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size: Optional[int] = None,
                 stride: int = 1,
                 padding: Optional[int] = None,
                 dilation: int = 1,
                 groups: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = DEFAULT_ACT,
                 deploy: bool = False,
                 init_cfg: OptConfigType = None):
        super().__init__(init_cfg)
        if kernel_size is None:
            kernel_size = self.default_kernel_size
        if kernel_size is None:
            raise ValueError(f'{type(self).__name__} needs a kernel_size')
        if act_cfg is DEFAULT_ACT:
            act_cfg = copy.deepcopy(self.default_act_cfg)
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
        problem = self._kernel_size_problem(kernel_size)
        if problem:
            raise ValueError(f'{type(self).__name__} needs {problem} (got kernel_size='
                             f'{kernel_size})')
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
        self.se: Optional[nn.Module] = None
        self.act = build_activation_layer(act_cfg) if act_cfg else nn.Identity()
        self.reparam_conv: Optional[nn.Conv2d] = self._new_reparam_conv() if deploy else None
        if not deploy:
            self._build_branches()

    @classmethod
    def _kernel_size_problem(cls, kernel_size: int) -> Optional[str]:
        """What the block needs of ``kernel_size`` when it is not met, else None."""
        if kernel_size < cls._min_kernel_size:
            return (f'kernel_size >= {cls._min_kernel_size}; use ConvBN for '
                    f'{kernel_size}x{kernel_size}')
        return None

    @classmethod
    def replacement_problem(cls, conv: nn.Conv2d) -> Optional[str]:
        """Why a block of this type cannot take the place of ``conv`` (with the BatchNorm
        after it); None when it can.

        What a block type can replace is declared once, by the class attributes next to its
        fold (:attr:`_min_kernel_size` / :meth:`_kernel_size_problem`,
        :attr:`_supports_groups`, :attr:`_needs_same_padding`): this method reads them, so
        :func:`mmreparam.reparameterize` and the block's constructor agree. The block takes
        a square kernel, one stride, one dilation and one zero padding for both axes.

        Args:
            conv (nn.Conv2d): The convolution to replace.

        Returns:
            str | None: The reason, or None.
        """
        sizes = dict(kernel_size=conv.kernel_size, stride=conv.stride, dilation=conv.dilation,
                     padding=conv.padding)
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (give it in pixels)"
        for name, value in sizes.items():
            if len(set(value)) != 1:
                return f'{name}={tuple(value)} is not the same for both axes'
        if conv.padding_mode != 'zeros':
            return f"padding_mode={conv.padding_mode!r} (the blocks pad with zeros)"
        k, padding, dilation = conv.kernel_size[0], conv.padding[0], conv.dilation[0]
        problem = cls._kernel_size_problem(k)
        if problem:
            return f'{cls.__name__} needs {problem} (got {k}x{k})'
        if conv.groups > 1 and not cls._supports_groups:
            return f'{cls.__name__} does not support groups > 1 (groups={conv.groups})'
        if cls._needs_same_padding and (k % 2 == 0 or padding != dilation * (k // 2)):
            return (f'{cls.__name__} needs an odd kernel and padding = dilation * (k // 2) '
                    f'(got {k}x{k}, padding={padding}, dilation={dilation})')
        return None

    def _build_branches(self) -> None:
        """Build the training-time branches (the geometry is set on ``self``)."""
        raise NotImplementedError

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

    @property
    def deploy(self) -> bool:
        """Whether the block is in its deploy form (the same as :attr:`folded`)."""
        return self.reparam_conv is not None

    def kernel_and_affine(self) -> Tuple[Tensor, Affine]:
        """The linear part as one kernel followed by an eval-mode affine map.

        Folded: ``reparam_conv``'s kernel and bias. Otherwise the folded kernel and bias of
        :meth:`get_equivalent_kernel_bias`; blocks whose linear part is "one kernel, then one
        BN" override this to keep their BN, so that a conversion between two such blocks
        copies the BN statistics as they are.
        """
        if self.reparam_conv is not None:
            return self.reparam_conv.weight, Affine(self.reparam_conv.bias)
        kernel, bias = self.get_equivalent_kernel_bias()
        return kernel, Affine(bias)

    def expansion_state(self, kernel: Tensor, affine: Affine) -> Dict[str, Tensor]:
        """The state with which this block computes ``affine(conv(x, kernel))`` in eval mode.

        The inverse of :meth:`kernel_and_affine` (and of the fold): a folded block gets the
        folded kernel and bias; a train-time block gets the kernel in its origin branch and
        the affine map in that branch's BN, and every other branch switched off (OREPA: its
        ``vector`` rows 0; a branch's last BN: weight 0, bias 0), their weights kept. The SE
        module and activation (not linear) are left as they are.

        Args:
            kernel (Tensor): ``(out_channels, in_channels // groups, k, k)``.
            affine (Affine): The map after the kernel.

        Returns:
            dict[str, Tensor]: The block's full state_dict, floating tensors in float64.

        Raises:
            ExpansionError: The block cannot represent the function (e.g. a non-affine BN).
        """
        state = float64_state(self)
        kernel = kernel.detach().to('cpu', torch.float64)
        affine = Affine(*(t.detach().to('cpu', torch.float64) if isinstance(t, Tensor) else t
                          for t in affine))
        if self.reparam_conv is not None:
            weight, bias = affine.fold_into(kernel)
            state.update({'reparam_conv.weight': weight, 'reparam_conv.bias': bias})
        else:
            self._expand_branches(state, kernel, affine)
        return state

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        """Write the train-time expansion of ``kernel`` and ``affine`` into ``state``."""
        raise ExpansionError(f'{type(self).__name__} does not know how to expand a kernel '
                             'into its branches')

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
        branches = [name for name in self._modules if name not in self._kept_on_fold]
        replace_branches(self, 'reparam_conv', self.get_equivalent_kernel_bias,
                         self._new_reparam_conv,
                         delete=branches + list(self._parameters) + list(self._buffers))
        return self

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, folded={self.reparam_conv is not None}')
