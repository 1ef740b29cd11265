"""``mmreparam.RepMLPResNet``: RepMLP-Res50 (Ding et al., arXiv 2105.01883).

ResNet-50 whose stride-1 bottlenecks in the chosen stages (c3 and c4 in the paper) are
replaced by units around a :class:`~mmreparam.models.layers.RepMLPBlock`, as in the official
``repmlp_resnet.py`` / ``repmlp_blocks.py`` (DingXiaoH/RepMLP).
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from ..layers.factory import build_reparam_conv, check_reparam
from ..layers.repmlp import GLOBAL_PERCEPTRONS, RepMLPBlock
from .base import RELU, check_out_indices, check_per_stage
from .resnet import Bottleneck, ResidualBackbone, _ResUnit


class RepMLPLightUnit(_ResUnit):
    """RepMLP Light Block (paper appendix): ``1x1 -> RepMLP -> ReLU -> 1x1`` + shortcut.

    The ``1x1`` convolutions reduce the channels 8x around the RepMLP (``width`` is
    ``planes // 2``, with ``planes`` a quarter of the output channels).

    Args:
        inplanes (int): Input channels.
        planes (int): A quarter of the output channels (ResNet's ``planes``).
        width (int): Channels of the RepMLP.
        repmlp_cfg (dict): Keyword arguments of :class:`RepMLPBlock` besides the channels.
        reparam (str): Block type of the convolutions (see :class:`mmreparam.ResNet`).
        norm_cfg (dict): BatchNorm config.
        with_cp (bool): Gradient checkpointing. Defaults to False.
        downsample (nn.Module, optional): Shortcut projection. Defaults to None.
        deploy (bool): Build the folded structure. Defaults to False.
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, width: int, repmlp_cfg: dict, reparam: str,
                 norm_cfg: ConfigType, with_cp: bool = False,
                 downsample: Optional[nn.Module] = None, deploy: bool = False):
        super().__init__(with_cp)
        self.conv1 = build_reparam_conv(reparam, inplanes, width, 1, norm_cfg=norm_cfg,
                                        act_cfg=RELU, deploy=deploy)
        self.repmlp = RepMLPBlock(width, width, norm_cfg=norm_cfg, deploy=deploy, **repmlp_cfg)
        self.conv3 = build_reparam_conv(reparam, width, planes * self.expansion, 1,
                                        norm_cfg=norm_cfg, deploy=deploy)
        self.downsample = downsample

    last_conv_name = 'conv3'

    def _residual(self, x: Tensor) -> Tensor:
        return self.conv3(F.relu(self.repmlp(self.conv1(x))))


class RepMLPBottleneckUnit(_ResUnit):
    """RepMLP Bottleneck (paper Fig. 4): ``1x1 -> 3x3 (/r) -> RepMLP -> ReLU -> 3x3 (xr) ->
    1x1`` plus the shortcut.

    Args:
        inplanes (int): Input channels.
        planes (int): Channels of the ``1x1`` convolutions (a quarter of the output).
        width (int): Channels of the RepMLP (``planes // r``).
        repmlp_cfg (dict): Keyword arguments of :class:`RepMLPBlock` besides the channels.
        reparam (str): Block type of the convolutions (see :class:`mmreparam.ResNet`).
        norm_cfg (dict): BatchNorm config.
        dilation (int): Dilation of the ``3x3`` convolutions. Defaults to 1.
        with_cp (bool): Gradient checkpointing. Defaults to False.
        downsample (nn.Module, optional): Shortcut projection. Defaults to None.
        deploy (bool): Build the folded structure. Defaults to False.
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, width: int, repmlp_cfg: dict, reparam: str,
                 norm_cfg: ConfigType, dilation: int = 1, with_cp: bool = False,
                 downsample: Optional[nn.Module] = None, deploy: bool = False):
        super().__init__(with_cp)

        def conv(cin, cout, k, act=True):
            return build_reparam_conv(reparam, cin, cout, k, dilation=dilation if k > 1 else 1,
                                      norm_cfg=norm_cfg, act_cfg=RELU if act else None,
                                      deploy=deploy)

        self.conv1 = conv(inplanes, planes, 1)
        self.conv2 = conv(planes, width, 3)
        self.repmlp = RepMLPBlock(width, width, norm_cfg=norm_cfg, deploy=deploy, **repmlp_cfg)
        self.conv4 = conv(width, planes, 3)
        self.conv5 = conv(planes, planes * self.expansion, 1, act=False)
        self.downsample = downsample

    last_conv_name = 'conv5'

    def _residual(self, x: Tensor) -> Tensor:
        out = F.relu(self.repmlp(self.conv2(self.conv1(x))))
        return self.conv5(self.conv4(out))


def _arch(unit, repmlp_widths, fc3_groups, stage_blocks=(3, 4, 6, 3), repmlp_stages=(1, 2)):
    return dict(unit=unit, stage_blocks=stage_blocks, repmlp_stages=repmlp_stages,
                repmlp_widths=repmlp_widths, fc3_groups=fc3_groups)


@MODELS.register_module()
class RepMLPResNet(ResidualBackbone):
    """RepMLP-ResNet backbone (RepMLP-Res50, arXiv 2105.01883).

    A ResNet-50 (stem ``stem`` + ``maxpool``, stages ``layer1`` ... ``layer4``, the bottleneck
    units of :class:`mmreparam.ResNet`) in which every unit but the first (the stride-2,
    channel-changing one) of ``repmlp_stages`` (c3 and c4) is a RepMLP unit: ``'light'``
    (:class:`RepMLPLightUnit`, RepMLP on ``planes // 2`` channels, ``fc3_groups=4``) or
    ``'bottleneck'`` (:class:`RepMLPBottleneckUnit`, RepMLP on ``planes // r`` channels with
    ``r = 2, 4`` for c3, c4, ``fc3_groups=8``). The settings are those of the official
    ``create_RepMLPRes50_Light_224`` / ``create_RepMLPRes50_Bottleneck_224``: ``h = w = 7``,
    local kernels ``(1, 3, 5)``, global perceptron reduction 1.

    **Input size.** The paper's global perceptron (``global_perceptron='partition'``) sees
    all partitions of a stage at once, so the backbone takes ``img_size`` inputs only (the
    stage sizes follow from it and must be divisible by the partition). That suits
    classification and fixed-size crops (the paper's Cityscapes setting with mmseg's
    ``mode='slide'`` inference). For inputs of any size (mmdet) use
    ``global_perceptron='channel'`` (RepMLPNet's channel weights; ``img_size`` is then
    unused) or None, with ``pad_input=True`` to zero-pad stage maps that are not multiples of
    the partition (the output is cropped back); without it such inputs raise a ValueError.

    Args:
        arch (str | dict): ``'light'`` or ``'bottleneck'``, or a dict with ``unit``
            (``'light'`` / ``'bottleneck'``), ``stage_blocks``, ``repmlp_stages`` (indices of
            the stages with RepMLP units), ``repmlp_widths`` (``planes`` divided by this, one
            per RepMLP stage, is the RepMLP width) and ``fc3_groups`` (int or one per RepMLP
            stage). Defaults to ``'light'``.
        img_size (int | tuple[int, int]): Input size for the ``'partition'`` global
            perceptron. Defaults to 224.
        partition_size (int | tuple[int, int]): ``(h, w)`` of the RepMLP partitions.
            Defaults to 7.
        reparam_conv_kernels (Sequence[int]): Local perceptron kernels. Defaults to
            ``(1, 3, 5)``.
        global_perceptron (str, optional): ``'partition'`` (paper), ``'channel'`` or None.
            Defaults to ``'partition'``.
        gp_reduction (int | Sequence[int], optional): Global perceptron MLP reduction, one
            value or one per RepMLP stage (the paper uses 4, 8 for Cityscapes). None: the
            block's default (1 for ``'partition'``, 4 for ``'channel'``).
        pad_input (bool): Zero-pad RepMLP inputs to multiples of the partition (not with
            ``'partition'``). Defaults to False.
        reparam (str | dict): Block type of the convolutions ('base', 'ACB', 'DBB', 'OREPA',
            'RepVGG', 'OREPA_VGG', or a dict with block arguments; see
            :class:`mmreparam.ResNet`). Defaults to 'base'.
        in_channels (int): Input channels. Defaults to 3.
        base_channels (int): Width of the stem and the first stage's ``planes``.
            Defaults to 64.
        strides (Sequence[int]): Stride of each stage. Defaults to (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        out_indices (int | Sequence[int]): Stages whose outputs are returned; negative ones
            count from the last. Defaults to (3, ).
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem). Defaults to -1.
        norm_cfg (dict): Any BatchNorm. Defaults to ``dict(type='BN')``.
        norm_eval (bool): Keep BNs in eval mode while training. Defaults to False.
        with_cp (bool): Gradient checkpointing of each unit. Defaults to False.
        zero_init_residual (bool): Zero the BN scales ending each unit. Defaults to False.
        deploy (bool): Build the folded structure. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config.
    """
    arch_settings = {
        'light': _arch('light', repmlp_widths=(2, 2), fc3_groups=4),
        'bottleneck': _arch('bottleneck', repmlp_widths=(2, 4), fc3_groups=8),
    }
    unit_types = {'light': RepMLPLightUnit, 'bottleneck': RepMLPBottleneckUnit}

    def __init__(self,
                 arch: Union[str, dict] = 'light',
                 img_size: Union[int, Tuple[int, int]] = 224,
                 partition_size: Union[int, Tuple[int, int]] = 7,
                 reparam_conv_kernels: Sequence[int] = (1, 3, 5),
                 global_perceptron: Optional[str] = 'partition',
                 gp_reduction: Union[None, int, Sequence[int]] = None,
                 pad_input: bool = False,
                 reparam: Union[str, dict] = 'base',
                 in_channels: int = 3,
                 base_channels: int = 64,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 frozen_stages: int = -1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 zero_init_residual: bool = False,
                 deploy: bool = False,
                 init_cfg: OptConfigType = [
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(type='Constant', val=1, layer=['_BatchNorm'])
                 ]):
        super().__init__(init_cfg)
        arch = self._check_arch(arch)
        self.reparam = check_reparam(reparam)
        num_stages = len(arch['stage_blocks'])
        check_per_stage(num_stages, strides=strides, dilations=dilations)
        out_indices = check_out_indices(out_indices, num_stages)
        if global_perceptron not in (*GLOBAL_PERCEPTRONS, None):
            raise ValueError(f'global_perceptron must be one of {GLOBAL_PERCEPTRONS} or None, '
                             f'got {global_perceptron!r}')
        self.arch = arch
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.global_perceptron = global_perceptron
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_cfg = norm_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self._built_deploy = deploy

        self.stem = self._conv(in_channels, base_channels, 7, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Stage sizes for the 'partition' global perceptron: every stride-s layer (7x7 stem,
        # max pool, first 3x3 of a stage) maps a size n to ceil(n / s).
        feat_size = [math.ceil(s / 4) for s in self.img_size]
        repmlp_stages = list(arch['repmlp_stages'])
        gp_reductions = self._per_repmlp_stage(gp_reduction, 'gp_reduction', repmlp_stages)
        fc3_groups = self._per_repmlp_stage(arch['fc3_groups'], 'fc3_groups', repmlp_stages)
        inplanes = base_channels
        self.res_layers = []
        for i, num_units in enumerate(arch['stage_blocks']):
            planes = base_channels * 2**i
            feat_size = [math.ceil(s / strides[i]) for s in feat_size]
            repmlp_cfg, width = None, None
            if i in repmlp_stages:
                j = repmlp_stages.index(i)
                if global_perceptron == 'partition':
                    self._check_stage_size(i, feat_size, partition_size)
                repmlp_cfg = dict(
                    partition_size=partition_size, reparam_conv_kernels=reparam_conv_kernels,
                    groups=fc3_groups[j], global_perceptron=global_perceptron,
                    gp_reduction=gp_reductions[j], pad_input=pad_input,
                    input_size=tuple(feat_size) if global_perceptron == 'partition' else None)
                width = planes // arch['repmlp_widths'][j]
            layer = self._make_layer(inplanes, planes, num_units, strides[i], dilations[i],
                                     repmlp_cfg, width)
            inplanes = planes * Bottleneck.expansion
            self.add_module(f'layer{i + 1}', layer)
            self.res_layers.append(f'layer{i + 1}')
        self.feat_dim = inplanes
        self._freeze_stages()

    def _check_arch(self, arch) -> dict:
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'unknown RepMLPResNet arch {arch!r}; choose one of '
                                 f'{list(self.arch_settings)}')
            return self.arch_settings[arch]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        missing = {'unit', 'repmlp_widths', 'fc3_groups'} - set(arch)
        if missing:
            raise ValueError(f'arch dict misses {sorted(missing)}')
        arch = dict(dict(stage_blocks=(3, 4, 6, 3), repmlp_stages=(1, 2)), **arch)
        if arch['unit'] not in self.unit_types:
            raise ValueError(f"arch unit must be one of {list(self.unit_types)}, got "
                             f"{arch['unit']!r}")
        if len(arch['repmlp_widths']) != len(arch['repmlp_stages']):
            raise ValueError('arch repmlp_widths needs one value per RepMLP stage')
        if any(not 0 <= i < len(arch['stage_blocks']) for i in arch['repmlp_stages']):
            raise ValueError(f"arch repmlp_stages {tuple(arch['repmlp_stages'])} must index "
                             'the stages')
        return arch

    def _check_stage_size(self, stage: int, feat_size, partition_size):
        h, w = (partition_size, ) * 2 if isinstance(partition_size, int) else partition_size
        if feat_size[0] % h or feat_size[1] % w:
            raise ValueError(
                f'RepMLPResNet: with img_size {self.img_size[0]}x{self.img_size[1]}, stage '
                f'{stage + 1} maps are {feat_size[0]}x{feat_size[1]}, not divisible by the '
                f"{h}x{w} partition (global_perceptron='partition' needs a fixed, divisible "
                'size); change img_size or partition_size')

    @staticmethod
    def _per_repmlp_stage(value, name: str, stages: list) -> list:
        if value is None or isinstance(value, int):
            return [value] * len(stages)
        if len(value) != len(stages):
            raise ValueError(f'{name} needs one value or one per RepMLP stage ({len(stages)}), '
                             f'got {value!r}')
        return list(value)

    def _conv(self, in_channels, out_channels, kernel_size, stride=1, act=True):
        return build_reparam_conv(self.reparam, in_channels, out_channels, kernel_size, stride,
                                  norm_cfg=self.norm_cfg, act_cfg=RELU if act else None,
                                  deploy=self.deploy)

    def _make_layer(self, inplanes, planes, num_units, stride, dilation, repmlp_cfg,
                    width) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        units = []
        for i in range(num_units):
            downsample = None
            if i == 0 and (stride != 1 or inplanes != out_channels):
                downsample = nn.Sequential(
                    self._conv(inplanes, out_channels, 1, stride=stride, act=False))
            cin = inplanes if i == 0 else out_channels
            if repmlp_cfg is None or i == 0:  # the first unit keeps the ResNet bottleneck
                unit = Bottleneck(cin, planes, self.reparam, stride=stride if i == 0 else 1,
                                  dilation=dilation, downsample=downsample,
                                  with_cp=self.with_cp, norm_cfg=self.norm_cfg,
                                  deploy=self.deploy)
            else:
                kwargs = dict(dilation=dilation) if self.arch['unit'] == 'bottleneck' else {}
                unit = self.unit_types[self.arch['unit']](
                    cin, planes, width, repmlp_cfg, self.reparam, self.norm_cfg,
                    with_cp=self.with_cp, deploy=self.deploy, **kwargs)
            units.append(unit)
        return nn.Sequential(*units)

    def forward_stem(self, x: Tensor) -> Tensor:
        """Check the input size (``'partition'``), then the stem and the max pooling."""
        if self.global_perceptron == 'partition' and tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"RepMLPResNet with global_perceptron='partition' takes "
                f'{self.img_size[0]}x{self.img_size[1]} inputs only (img_size), got '
                f'{x.shape[2]}x{x.shape[3]}; for inputs of any size (detection) use '
                "global_perceptron='channel' (or None) with pad_input=True")
        return super().forward_stem(x)


__all__ = ['RepMLPResNet', 'RepMLPLightUnit', 'RepMLPBottleneckUnit']
