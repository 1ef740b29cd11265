"""Squeeze-and-excitation after a block's sum of branches (kept as it is by the fold)."""
from typing import Optional, Sequence, Union

import torch
from mmcv.cnn import build_activation_layer, build_conv_layer
from mmengine.model import BaseModule
from torch import Tensor

from ...utils import ConfigType, OptConfigType


def make_divisible(value: float, divisor: int, min_value: Optional[int] = None,
                   min_ratio: float = 0.9) -> int:
    """The multiple of ``divisor`` nearest ``value``, at least ``min_value`` (default
    ``divisor``) and not below ``min_ratio * value`` (mmpretrain's ``make_divisible``)."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < min_ratio * value:
        new_value += divisor
    return new_value


class SELayer(BaseModule):
    """Squeeze-and-excitation with mmpretrain's ``SELayer`` arguments (``se_cfg``).

    ``x * gate(up(act(down(avgpool(x)))))``. The 1x1 convolutions are named ``down`` and
    ``up`` as in the official RepVGG's SE (so official, mmpretrain and mmreparam checkpoints
    share one layout); the activations have no state. The SE sits after the block's sum of
    branches, outside the folded convolution, so a fold keeps it as it is.

    Args:
        channels (int): Channels of the input.
        squeeze_channels (int, optional): Channels of the bottleneck; None gives
            ``make_divisible(channels // ratio, divisor)``. Defaults to None.
        ratio (int): Squeeze ratio. Defaults to 16.
        divisor (int): The bottleneck width is a multiple of it. Defaults to 8.
        bias (bool | str): Biases of the two convolutions; 'auto' means True (there is no
            norm layer). Defaults to 'auto'.
        conv_cfg (dict, optional): Config of the two convolutions (any conv: the SE is not
            folded). Defaults to None (``nn.Conv2d``).
        act_cfg (dict | Sequence[dict]): The activation after ``down`` and the gate after
            ``up``; one dict is used for both. Defaults to
            ``(dict(type='ReLU'), dict(type='Sigmoid'))``.
        return_weight (bool): mmpretrain's option to return the gate instead of the scaled
            input; must be False in a RepVGG block. Defaults to False.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    _min_squeeze = 1

    def __init__(self,
                 channels: int,
                 squeeze_channels: Optional[int] = None,
                 ratio: int = 16,
                 divisor: int = 8,
                 bias: Union[bool, str] = 'auto',
                 conv_cfg: OptConfigType = None,
                 act_cfg: Union[ConfigType, Sequence[ConfigType]] = (dict(type='ReLU'),
                                                                     dict(type='Sigmoid')),
                 return_weight: bool = False,
                 init_cfg: OptConfigType = None):
        super().__init__(init_cfg)
        if return_weight:
            raise ValueError('se_cfg return_weight=True is not supported: a RepVGG block '
                             'scales its output by the SE gate')
        if isinstance(act_cfg, dict):
            act_cfg = (act_cfg, act_cfg)
        if len(act_cfg) != 2 or not all(isinstance(cfg, dict) for cfg in act_cfg):
            raise ValueError(f'se_cfg act_cfg must be a dict or two dicts, got {act_cfg!r}')
        if squeeze_channels is None:
            squeeze_channels = make_divisible(channels // ratio, divisor)
        if not isinstance(squeeze_channels, int) or squeeze_channels < self._min_squeeze:
            wanted = ('a positive int' if self._min_squeeze == 1
                      else f'an int of at least {self._min_squeeze}')
            raise ValueError(f'SE squeeze_channels must be {wanted}, got {squeeze_channels!r}')
        if bias not in ('auto', True, False):
            raise ValueError(f"se_cfg bias must be 'auto', True or False, got {bias!r}")
        bias = True if bias == 'auto' else bias
        self.down = build_conv_layer(conv_cfg, channels, squeeze_channels, 1, bias=bias)
        self.act = build_activation_layer(dict(act_cfg[0]))
        self.up = build_conv_layer(conv_cfg, squeeze_channels, channels, 1, bias=bias)
        self.gate = build_activation_layer(dict(act_cfg[1]))

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel by a gate computed from the global average."""
        gate = torch.mean(x, dim=(2, 3), keepdim=True)
        return x * self.gate(self.up(self.act(self.down(gate))))


class SEBlock(SELayer):
    """The official RepVGG's SE, ``SEBlock(channels, internal_channels)``: an
    :class:`SELayer` with ``squeeze_channels=internal_channels`` (same function and keys),
    but like the official one it takes ``internal_channels=0`` (``channels // 16`` of a
    narrow block: the gate is then a constant per channel), which :class:`SELayer` refuses.

    Args:
        channels (int): Channels of the input.
        internal_channels (int): Channels of the bottleneck.
    """

    _min_squeeze = 0

    def __init__(self, channels: int, internal_channels: int):
        super().__init__(channels, squeeze_channels=internal_channels)


__all__ = ['make_divisible', 'SELayer', 'SEBlock']
