"""Choosing a block per convolution: the official per-kernel-size rule."""
import functools
import inspect
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

from mmcv.cnn import build_activation_layer, build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...utils import ConfigType, OptConfigType
from .base import registered_block_types


class ReparamTypes(Mapping):
    """``{reparam name: main block type}``, read from the registered block types'
    :attr:`~mmreparam.models.layers.ReparamBlock.reparam_names` on every use, so that a
    block type registered later (a new module, a user's block) is in it.

    Args:
        base (type, optional): Keep only the names whose main type is a subclass of it
            (``RepVGG.block_types``: the RepVGG-style blocks). Defaults to None (all).
    """

    def __init__(self, base: Optional[type] = None):
        self.base = base

    def _table(self) -> Dict[str, type]:
        table: Dict[str, type] = {}
        for cls in registered_block_types():
            for name in cls.__dict__.get('reparam_names', ()):
                table.setdefault(name, cls)
        if self.base is None:
            return table
        return {name: cls for name, cls in table.items() if issubclass(cls, self.base)}

    def __getitem__(self, name: str) -> type:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self._table()!r})'


#: The values of ``reparam=`` and the main block type of each (the one that takes the
#: block arguments; for every name but ``'OREPA'`` the only one): derived from the block
#: classes' own ``reparam_names``, never typed here.
REPARAM_TYPES: Mapping[str, type] = ReparamTypes()


def reparam_block_family(reparam: str) -> Tuple[type, ...]:
    """The registered block types that ``reparam=`` the name ``reparam`` puts on
    convolutions (its :data:`REPARAM_TYPES` entry first)."""
    return tuple(cls for cls in registered_block_types()
                 if reparam in cls.__dict__.get('reparam_names', ()))


def reparam_of_block_type(block_type: type) -> Optional[str]:
    """The ``reparam=`` value whose blocks include ``block_type`` (``'base'`` for
    :class:`ConvBN`, which every ``reparam`` uses outside its kernel sizes); None if none."""
    names = getattr(block_type, '__dict__', {}).get('reparam_names', ())
    return names[0] if names else None


#: A ``reparam=`` value: a name of :data:`REPARAM_TYPES`, or a dict with ``type`` (such a
#: name) and arguments of that block type (``dict(type='DBB', internal_channels_1x1_3x3=8)``).
ReparamCfg = Union[str, dict]


def block_arg_names(block_type: type) -> Tuple[str, ...]:
    """The arguments a block type takes beyond :class:`ReparamBlock`'s geometry: the
    keyword-only arguments of the ``__init__`` of each class from ``block_type`` up to (not
    including) the base class, e.g. ``('internal_channels_1x1_3x3', )`` for DBB."""
    if isinstance(block_type, functools.partial):  # a backbone's table: fixed arguments
        fixed = set(block_type.keywords)
        return tuple(n for n in block_arg_names(block_type.func) if n not in fixed)
    if not isinstance(block_type, type):  # a builder function
        return tuple(p.name for p in inspect.signature(block_type).parameters.values()
                     if p.kind is p.KEYWORD_ONLY)
    names = []
    for cls in block_type.__mro__:
        if cls.__name__ == 'ReparamBlock':
            break
        init = cls.__dict__.get('__init__')
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in names:
                names.append(param.name)
    return tuple(names)


def _type_name(block_type) -> str:
    return getattr(getattr(block_type, 'func', block_type), '__name__', repr(block_type))


def parse_reparam(reparam: ReparamCfg,
                  types: Optional[Mapping[str, type]] = None) -> Tuple[str, Dict]:
    """Split a ``reparam=`` value into the name and the block arguments, checking both.

    Args:
        reparam (str | dict): A name of :data:`REPARAM_TYPES`, or a dict with ``type`` (such
            a name, ``'mmreparam.'`` prefix allowed) and arguments of that block type, which
            go to every block of that type (``reparam='OREPA'``'s ``1x1`` and large-kernel
            companions take none).
        types (Mapping[str, type], optional): The block types to choose from, by name (a
            backbone's own table, e.g. RepOptVGG's with ``'CSLA'``). Defaults to
            :data:`REPARAM_TYPES`.

    Returns:
        tuple[str, dict]: The name and the block arguments (a new dict).

    Raises:
        ValueError: Unknown name, a dict without ``type``, or an argument the block does not
            take (the message lists the choices).
    """
    types = REPARAM_TYPES if types is None else types
    if isinstance(reparam, str):
        name, args = reparam, {}
    elif isinstance(reparam, Mapping):
        args = dict(reparam)
        name = args.pop('type', None)
        if not isinstance(name, str):
            raise ValueError(f'a reparam dict needs type= one of {sorted(types)}, '
                             f'got {dict(reparam)}')
    else:
        raise ValueError(f'reparam must be a name ({sorted(types)}) or a dict with '
                         f'type= and block arguments, got {type(reparam).__name__}')
    if name.startswith('mmreparam.'):
        name = name[len('mmreparam.'):]
    if name not in types:
        raise ValueError(f'unknown reparam {name!r}; choose one of {sorted(types)}')
    allowed = block_arg_names(types[name])
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ValueError(f'reparam {name!r} ({_type_name(types[name])}) takes no argument '
                         f'{unknown}; its arguments are {list(allowed) or "none"}')
    return name, args


def check_reparam(reparam: ReparamCfg) -> ReparamCfg:
    """Check a ``reparam=`` value (:func:`parse_reparam`) and return it: the name when it
    has no block arguments, else ``dict(type=name, **args)``; raise a ValueError listing the
    choices otherwise."""
    name, args = parse_reparam(reparam)
    return dict(type=name, **args) if args else name


def reparam_name(reparam: ReparamCfg) -> str:
    """The name of a ``reparam=`` value (``'DBB'`` for ``dict(type='DBB', ...)``)."""
    return parse_reparam(reparam)[0]


def reparam_block_type(reparam: ReparamCfg, kernel_size: int, groups: int = 1) -> type:
    """The block class for one convolution, following the official implementations.

    The block type of the name whose :meth:`~mmreparam.models.layers.ReparamBlock.chosen_for`
    takes the convolution, else :class:`ConvBN`. For the built-in names: OREPA: ``1x1`` ->
    :class:`OREPA1x1` (groups=1), ``k >= 7`` -> :class:`OREPALargeConv` (groups=1), else
    :class:`OREPA`. DBB / ACB / RepVGG / QARepVGG / OREPA_VGG: only ``1 < k < 7`` change;
    other convolutions are :class:`ConvBN`. ``base``: always :class:`ConvBN`.
    """
    for block_type in reparam_block_family(reparam_name(reparam)):
        if block_type.chosen_for(kernel_size, groups):
            return block_type
    return REPARAM_TYPES['base']


def describe_choice(reparam: ReparamCfg) -> str:
    """Which convolutions ``reparam`` turns into blocks, in words (``'1 < k < 7'``; with
    the block type of each when the name has several)."""
    family = reparam_block_family(reparam_name(reparam))
    if len(family) == 1:
        return family[0].describe_choice()
    return ', '.join(f'{cls.describe_choice()} ({cls.__name__})' for cls in family)


#: ``conv_cfg`` types that build the plain ``nn.Conv2d`` re-param blocks are made of.
PLAIN_CONV_TYPES = ('Conv', 'Conv2d', nn.Conv2d)


def is_plain_conv_cfg(conv_cfg: OptConfigType) -> bool:
    """Whether ``conv_cfg`` builds a plain ``nn.Conv2d`` and nothing more: None, or
    ``dict(type='Conv2d')`` / ``dict(type='Conv')`` without other keys."""
    if conv_cfg is None:
        return True
    return set(conv_cfg) == {'type'} and conv_cfg['type'] in PLAIN_CONV_TYPES


def check_conv_cfg(reparam: ReparamCfg, conv_cfg: OptConfigType) -> None:
    """Raise a ValueError if the blocks of ``reparam`` cannot honour ``conv_cfg``.

    ``reparam='base'`` takes any ``conv_cfg`` (:func:`build_reparam_conv` builds it with
    mmcv's ``build_conv_layer``); the re-param blocks build their own ``nn.Conv2d`` branches
    and fold them into one ``nn.Conv2d``, so they take only a plain convolution.
    """
    reparam = reparam_name(reparam)
    if reparam != 'base' and not is_plain_conv_cfg(conv_cfg):
        raise ValueError(
            f'conv_cfg={dict(conv_cfg)} is not supported with reparam={reparam!r}: its blocks '
            'build their own nn.Conv2d branches and fold them into one nn.Conv2d; use '
            "conv_cfg=None or dict(type='Conv2d'), or reparam='base'")


def is_batch_norm(norm_cfg: ConfigType, num_features: int) -> bool:
    """Whether ``norm_cfg`` builds a BatchNorm (any ``_BatchNorm``, which folds)."""
    return isinstance(build_norm_layer(norm_cfg, num_features)[1], _BatchNorm)


def build_reparam_conv(reparam: ReparamCfg,
                       in_channels: int,
                       out_channels: int,
                       kernel_size: int,
                       stride: int = 1,
                       dilation: int = 1,
                       groups: int = 1,
                       norm_cfg: ConfigType = dict(type='BN'),
                       act_cfg: OptConfigType = None,
                       deploy: bool = False,
                       padding: Optional[int] = None,
                       conv_cfg: OptConfigType = None) -> nn.Module:
    """Build the block chosen by :func:`reparam_block_type` for one conv + norm (+ act).

    With ``reparam='base'`` and a ``conv_cfg`` other than a plain convolution, or a norm
    other than a BatchNorm (GroupNorm, ...), this is a :class:`ConvNormAct` (nothing to
    fold: ``deploy`` does not change it). The re-param blocks refuse such a ``conv_cfg``
    (:func:`check_conv_cfg`) and a norm that is not a BatchNorm
    (:func:`~mmreparam.models.layers.build_bn`). ``reparam`` may be a dict with block
    arguments (:func:`parse_reparam`); they go to the blocks of its own type.
    """
    reparam, block_args = parse_reparam(reparam)
    check_conv_cfg(reparam, conv_cfg)
    if reparam == 'base' and not (is_plain_conv_cfg(conv_cfg)
                                  and is_batch_norm(norm_cfg, out_channels)):
        return ConvNormAct(conv_cfg, in_channels, out_channels, kernel_size, stride, dilation,
                           groups, norm_cfg=norm_cfg, act_cfg=act_cfg, padding=padding)
    block = reparam_block_type(reparam, kernel_size, groups)
    if block is not REPARAM_TYPES[reparam]:
        block_args = {}
    return block(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                 dilation=dilation, groups=groups, norm_cfg=norm_cfg, act_cfg=act_cfg,
                 deploy=deploy, **block_args)


def _register_mmcv_ops(conv_cfg: ConfigType) -> None:
    """Import ``mmcv.ops`` (it registers ``DCN``, ``DCNv2``, ...) when ``conv_cfg`` names a
    type the registry does not know yet, as it does inside mmdet (which imports it)."""
    from mmengine.registry import MODELS as ROOT_MODELS
    layer_type = conv_cfg.get('type') if isinstance(conv_cfg, dict) else None
    if not isinstance(layer_type, str) or ROOT_MODELS.get(layer_type) is not None:
        return
    try:
        import mmcv.ops  # noqa: F401
    except ImportError as err:
        raise ImportError(f'conv type {layer_type!r} needs mmcv\'s compiled ops (mmcv.ops), '
                          f'which this mmcv does not have: {err}') from err


class ConvNormAct(BaseModule):
    """A convolution built from ``conv_cfg`` (e.g. DCN, ConvWS) followed by a norm (any that
    mmcv's ``build_norm_layer`` knows) and an activation.

    Not re-parameterizable (a deformable convolution or a GroupNorm has no plain-conv
    equivalent); used for the ``dcn`` stages of :class:`mmreparam.ResNet` and for its
    ``reparam='base'`` convolutions with another ``conv_cfg`` or norm than a plain conv + BN.
    It stays as it is after a fold. The norm is named as mmcv names it (``bn``, ``gn``, ...),
    so a BN one has the state_dict keys of :class:`ConvBN` (``conv.*``, ``bn.*``). Being a
    ``BaseModule``, it passes ``init_weights()`` on to its convolution (DCN zeroes its
    offsets there), as mmdet's units do.

    Args:
        conv_cfg (dict, optional): Convolution config; None for ``nn.Conv2d``.
        in_channels (int), out_channels (int): Channels.
        kernel_size (int): Kernel size.
        stride (int), dilation (int), groups (int): Of the convolution. Default to 1.
        norm_cfg (dict): Norm config. Defaults to ``dict(type='BN')``.
        act_cfg (dict, optional): Activation config; None for none. Defaults to None.
        padding (int, optional): None gives ``dilation * (kernel_size // 2)``.
    """

    def __init__(self, conv_cfg: OptConfigType, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'), act_cfg: OptConfigType = None,
                 padding: Optional[int] = None):
        super().__init__()
        _register_mmcv_ops(conv_cfg)
        if padding is None:
            padding = dilation * (kernel_size // 2)
        self.conv = build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, bias=False)
        self.norm_name, norm = build_norm_layer(norm_cfg, out_channels)
        self.add_module(self.norm_name, norm)
        self.act = build_activation_layer(act_cfg) if act_cfg else nn.Identity()

    @property
    def norm(self) -> nn.Module:
        """The norm layer (``self.bn``, ``self.gn``, ... as mmcv names it)."""
        return getattr(self, self.norm_name)

    def forward(self, x: Tensor) -> Tensor:
        """conv -> norm -> act."""
        return self.act(self.norm(self.conv(x)))
