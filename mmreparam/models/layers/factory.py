"""Choosing a block per convolution: the official per-kernel-size rule."""
from typing import Optional

from mmcv.cnn import build_activation_layer, build_conv_layer
from torch import Tensor, nn

from ...utils import ConfigType, OptConfigType
from .base import ReparamBlock, build_bn
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
                       padding: Optional[int] = None) -> ReparamBlock:
    """Build the block chosen by :func:`reparam_block_type` for one conv + BN (+ act)."""
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


class ConvNormAct(nn.Module):
    """A convolution built from ``conv_cfg`` (e.g. DCN) followed by a norm and activation.

    Not re-parameterizable (a deformable convolution has no plain-conv equivalent); used for
    the ``dcn`` stages of :class:`mmreparam.ResNet`, where it stays as it is after a fold.
    """

    def __init__(self, conv_cfg: ConfigType, in_channels: int, out_channels: int,
                 kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 norm_cfg: ConfigType = dict(type='BN'), act_cfg: OptConfigType = None):
        super().__init__()
        _register_mmcv_ops(conv_cfg)
        self.conv = build_conv_layer(conv_cfg, in_channels, out_channels, kernel_size,
                                     stride=stride, padding=dilation * (kernel_size // 2),
                                     dilation=dilation, groups=groups, bias=False)
        self.bn = build_bn(norm_cfg, out_channels)
        self.act = build_activation_layer(act_cfg) if act_cfg else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """conv -> norm -> act."""
        return self.act(self.bn(self.conv(x)))
