"""Choosing a block per convolution: the official per-kernel-size rule."""
from typing import Optional

from mmcv.cnn import build_activation_layer, build_conv_layer, build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...utils import ConfigType, OptConfigType
from .branches import ACB, DBB, ConvBN, QARepVGGBlock, RepVGGBlock
from .orepa import OREPA, OREPA1x1, OREPALargeConv, OREPAVGGBlock

#: The values of ``reparam=`` and the block each puts on ``1 < k < 7`` convolutions.
REPARAM_TYPES = {
    'base': ConvBN,
    'ACB': ACB,
    'DBB': DBB,
    'OREPA': OREPA,
    'RepVGG': RepVGGBlock,
    'QARepVGG': QARepVGGBlock,
    'OREPA_VGG': OREPAVGGBlock,
}


def reparam_of_block_type(block_type: type) -> Optional[str]:
    """The ``reparam=`` value whose blocks include ``block_type`` (``'base'`` for
    :class:`ConvBN`, which every ``reparam`` uses outside its kernel sizes); None if none."""
    if block_type in (OREPA1x1, OREPALargeConv):
        return 'OREPA'
    for reparam, main_type in REPARAM_TYPES.items():
        if block_type is main_type:
            return reparam
    return None


def check_reparam(reparam: str) -> str:
    """Return ``reparam`` if known, else raise a ValueError listing the choices."""
    if reparam not in REPARAM_TYPES:
        raise ValueError(f'unknown reparam {reparam!r}; choose one of '
                         f'{sorted(REPARAM_TYPES)}')
    return reparam


def reparam_block_type(reparam: str, kernel_size: int, groups: int = 1) -> type:
    """The block class for one convolution, following the official implementations.

    OREPA: ``1x1`` -> :class:`OREPA1x1` (groups=1), ``k >= 7`` -> :class:`OREPALargeConv`,
    else :class:`OREPA`. DBB / ACB / RepVGG / QARepVGG / OREPA_VGG: only ``1 < k < 7``
    change; other convolutions are :class:`ConvBN`. ``base``: always :class:`ConvBN`.
    """
    check_reparam(reparam)
    if reparam == 'OREPA':
        if kernel_size == 1:
            return OREPA1x1 if groups == 1 else ConvBN
        if kernel_size >= 7:
            return OREPALargeConv if groups == 1 else ConvBN
        return OREPA
    if 1 < kernel_size < 7:
        return REPARAM_TYPES[reparam]
    return ConvBN


#: ``conv_cfg`` types that build the plain ``nn.Conv2d`` re-param blocks are made of.
PLAIN_CONV_TYPES = ('Conv', 'Conv2d', nn.Conv2d)


def is_plain_conv_cfg(conv_cfg: OptConfigType) -> bool:
    """Whether ``conv_cfg`` builds a plain ``nn.Conv2d`` and nothing more: None, or
    ``dict(type='Conv2d')`` / ``dict(type='Conv')`` without other keys."""
    if conv_cfg is None:
        return True
    return set(conv_cfg) == {'type'} and conv_cfg['type'] in PLAIN_CONV_TYPES


def check_conv_cfg(reparam: str, conv_cfg: OptConfigType) -> None:
    """Raise a ValueError if the blocks of ``reparam`` cannot honour ``conv_cfg``.

    ``reparam='base'`` takes any ``conv_cfg`` (:func:`build_reparam_conv` builds it with
    mmcv's ``build_conv_layer``); the re-param blocks build their own ``nn.Conv2d`` branches
    and fold them into one ``nn.Conv2d``, so they take only a plain convolution.
    """
    if reparam != 'base' and not is_plain_conv_cfg(conv_cfg):
        raise ValueError(
            f'conv_cfg={dict(conv_cfg)} is not supported with reparam={reparam!r}: its blocks '
            'build their own nn.Conv2d branches and fold them into one nn.Conv2d; use '
            "conv_cfg=None or dict(type='Conv2d'), or reparam='base'")


def is_batch_norm(norm_cfg: ConfigType, num_features: int) -> bool:
    """Whether ``norm_cfg`` builds a BatchNorm (any ``_BatchNorm``, which folds)."""
    return isinstance(build_norm_layer(norm_cfg, num_features)[1], _BatchNorm)


def build_reparam_conv(reparam: str,
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
    (:func:`~mmreparam.models.layers.build_bn`).
    """
    check_conv_cfg(reparam, conv_cfg)
    if reparam == 'base' and not (is_plain_conv_cfg(conv_cfg)
                                  and is_batch_norm(norm_cfg, out_channels)):
        return ConvNormAct(conv_cfg, in_channels, out_channels, kernel_size, stride, dilation,
                           groups, norm_cfg=norm_cfg, act_cfg=act_cfg, padding=padding)
    block = reparam_block_type(reparam, kernel_size, groups)
    return block(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                 dilation=dilation, groups=groups, norm_cfg=norm_cfg, act_cfg=act_cfg,
                 deploy=deploy)


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
