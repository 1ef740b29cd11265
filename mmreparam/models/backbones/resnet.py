"""``mmreparam.ResNet``: mmdet's ResNet / ResNeXt / ResNetV1c / V1d with re-param blocks."""
from typing import List, Optional, Sequence, Union

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_plugin_layer
from mmengine.model import BaseModule, Sequential
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.normalization import GroupNorm

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType, pretrained_init
from ..layers.factory import ConvNormAct, build_reparam_conv, check_conv_cfg, check_reparam
from .base import RELU, ReparamBackbone, check_out_indices, check_per_stage

#: Where a plugin may go in a :class:`Bottleneck` (mmdet's positions).
PLUGIN_POSITIONS = ('after_conv1', 'after_conv2', 'after_conv3')


def check_plugins(plugins: Optional[Sequence[dict]], num_stages: Optional[int] = None) -> list:
    """Check mmdet's ``plugins`` form and return it as a list (``[]`` for None).

    Each plugin is ``dict(cfg=dict(type=...), position='after_conv1' | 'after_conv2' |
    'after_conv3', stages=None | one bool per stage)``; ``stages`` is checked against
    ``num_stages`` when given.

    Raises:
        ValueError: A plugin is not of that form.
    """
    if plugins is None:
        return []
    if isinstance(plugins, dict) or not isinstance(plugins, Sequence):
        raise ValueError(f'plugins must be a list of dict(cfg=..., position=...), got '
                         f'{type(plugins).__name__}')
    for plugin in plugins:
        if not isinstance(plugin, dict) or not isinstance(plugin.get('cfg'), dict):
            raise ValueError(f'each plugin must be a dict with a cfg dict, got {plugin!r}')
        if plugin.get('position') not in PLUGIN_POSITIONS:
            raise ValueError(f'plugin position must be one of {PLUGIN_POSITIONS}, got '
                             f'{plugin.get("position")!r}')
        stages = plugin.get('stages')
        if num_stages is not None and stages is not None and len(stages) != num_stages:
            raise ValueError(f'plugin stages {tuple(stages)} need one value per stage '
                             f'(num_stages={num_stages})')
    return list(plugins)


def stage_plugins(plugins: Sequence[dict], stage: int) -> List[dict]:
    """The plugins of stage ``stage`` (those whose ``stages`` is None or true there), without
    their ``stages`` key, as mmdet's ``ResNet.make_stage_plugins``."""
    chosen = []
    for plugin in plugins:
        stages = plugin.get('stages')
        if stages is None or stages[stage]:
            chosen.append({key: value for key, value in plugin.items() if key != 'stages'})
    return chosen



class _ResUnit(BaseModule):
    """Shared parts of the residual units: shortcut, with_cp, final ReLU."""

    def __init__(self, with_cp: bool, init_cfg: OptConfigType = None):
        super().__init__(init_cfg)
        self.with_cp = with_cp
        self.relu = nn.ReLU(inplace=True)

    #: The child whose BN ends the residual branch (zeroed by ``zero_init_residual``).
    last_conv_name = ''

    @property
    def last_conv(self) -> nn.Module:
        """The block whose BN ends the residual branch (``last_conv_name``)."""
        return getattr(self, self.last_conv_name)

    def _residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``relu(residual(x) + shortcut(x))``, checkpointed when ``with_cp`` in training."""

        def inner(x):
            identity = x if self.downsample is None else self.downsample(x)
            return self._residual(x) + identity

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(inner, x, use_reentrant=False)
        else:
            out = inner(x)
        return self.relu(out)


class BasicBlock(_ResUnit):
    """ResNet basic unit: ``conv1 (3x3, ReLU) -> conv2 (3x3)`` plus the shortcut.

    As in mmdet, it takes no ``dcn`` and no ``plugins`` (those need :class:`Bottleneck`).
    """
    expansion = 1

    def __init__(self, inplanes: int, planes: int, reparam: str, stride: int = 1,
                 dilation: int = 1, downsample: Optional[nn.Module] = None,
                 style: str = 'pytorch', with_cp: bool = False,
                 norm_cfg: ConfigType = dict(type='BN'), dcn: OptConfigType = None,
                 deploy: bool = False, groups: int = 1, base_width: int = 64,
                 conv_cfg: OptConfigType = None, plugins: Optional[List[dict]] = None,
                 init_cfg: OptConfigType = None):
        super().__init__(with_cp, init_cfg)
        if dcn is not None:
            raise ValueError('dcn is only supported with Bottleneck units (depth >= 50), '
                             'as in mmdet')
        if plugins:
            raise ValueError('plugins are only supported with Bottleneck units (depth >= 50), '
                             'as in mmdet')
        if groups != 1 or base_width != 64:
            raise ValueError('BasicBlock supports only groups=1 and base_width=64')
        common = dict(norm_cfg=norm_cfg, deploy=deploy, conv_cfg=conv_cfg)
        self.conv1 = build_reparam_conv(reparam, inplanes, planes, 3, stride, dilation,
                                        act_cfg=RELU, **common)
        self.conv2 = build_reparam_conv(reparam, planes, planes, 3, 1, dilation, **common)
        self.downsample = downsample

    last_conv_name = 'conv2'

    def _residual(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class Bottleneck(_ResUnit):
    """ResNet / ResNeXt bottleneck: ``1x1 -> 3x3 (groups) -> 1x1`` plus the shortcut.

    The stride is on the ``3x3`` for ``style='pytorch'`` and on the first ``1x1`` for
    ``'caffe'``. With ``groups > 1`` (ResNeXt) the width is
    ``floor(planes * base_width / 64) * groups``. ``plugins`` (mmdet's form, without
    ``stages``: see :class:`ResNet`) are built with mmcv's ``build_plugin_layer`` and run
    after ``conv1``, ``conv2`` (both with their ReLU; ``width`` channels) or ``conv3``
    (before the shortcut is added; ``planes * 4`` channels), in their order; each is a
    child named as mmcv names it (``context_block``, ``nonlocal_block``,
    ``gen_attention_block``, + ``cfg['postfix']``), as in mmdet. They are not part of any
    re-param block, so a fold leaves them as they are.
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, reparam: str, stride: int = 1,
                 dilation: int = 1, downsample: Optional[nn.Module] = None,
                 style: str = 'pytorch', with_cp: bool = False,
                 norm_cfg: ConfigType = dict(type='BN'), dcn: OptConfigType = None,
                 deploy: bool = False, groups: int = 1, base_width: int = 4,
                 conv_cfg: OptConfigType = None, plugins: Optional[List[dict]] = None,
                 init_cfg: OptConfigType = None):
        super().__init__(with_cp, init_cfg)
        if style not in ('pytorch', 'caffe'):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        plugins = check_plugins(plugins)
        width = planes if groups == 1 else (planes * base_width // 64) * groups
        stride1, stride2 = (1, stride) if style == 'pytorch' else (stride, 1)
        common = dict(norm_cfg=norm_cfg, deploy=deploy, conv_cfg=conv_cfg)
        self.conv1 = build_reparam_conv(reparam, inplanes, width, 1, stride1, act_cfg=RELU,
                                        **common)
        if dcn is not None:  # as mmdet: fallback_on_stride=True keeps a plain 3x3 here
            dcn = dict(dcn)
            if dcn.pop('fallback_on_stride', False):
                dcn = None
        if dcn is not None:
            if conv_cfg is not None:
                raise ValueError('conv_cfg must be None for the dcn stages (as in mmdet): '
                                 f'dcn={dcn} builds their 3x3')
            self.conv2 = ConvNormAct(dcn, width, width, 3, stride2, dilation, groups,
                                     norm_cfg=norm_cfg, act_cfg=RELU)
        else:
            self.conv2 = build_reparam_conv(reparam, width, width, 3, stride2, dilation,
                                            groups, act_cfg=RELU, **common)
        self.conv3 = build_reparam_conv(reparam, width, planes * self.expansion, 1, **common)
        self.downsample = downsample
        channels = dict(after_conv1=width, after_conv2=width,
                        after_conv3=planes * self.expansion)
        for position in PLUGIN_POSITIONS:
            names = self._make_plugins([p['cfg'] for p in plugins
                                        if p['position'] == position], channels[position])
            setattr(self, f'{position}_plugin_names', names)

    last_conv_name = 'conv3'

    def _make_plugins(self, cfgs: List[dict], in_channels: int) -> List[str]:
        names = []
        for cfg in cfgs:
            cfg = dict(cfg)
            try:
                name, layer = build_plugin_layer(cfg, postfix=cfg.pop('postfix', ''),
                                                 in_channels=in_channels)
            except KeyError as err:
                if 'Cannot find' not in str(err):
                    raise
                # mmcv's message names None, not the type.
                raise KeyError(f'unknown plugin type {cfg.get("type")!r} (a type of the '
                               f'registry of the default scope): {err}') from err
            if hasattr(self, name):
                raise ValueError(f'duplicate plugin name {name!r} in one unit: give each '
                                 "plugin of a type its own cfg['postfix']")
            self.add_module(name, layer)
            names.append(name)
        return names

    def _plugins(self, x: Tensor, names: List[str]) -> Tensor:
        for name in names:
            x = getattr(self, name)(x)
        return x

    def _residual(self, x: Tensor) -> Tensor:
        out = self._plugins(self.conv1(x), self.after_conv1_plugin_names)
        out = self._plugins(self.conv2(out), self.after_conv2_plugin_names)
        return self._plugins(self.conv3(out), self.after_conv3_plugin_names)


class ResidualBackbone(ReparamBackbone):
    """Base of the backbones built from residual units in stages ``layer1``, ``layer2``, ...
    (named in ``self.res_layers``), with mmdet's ``zero_init_residual``."""

    def init_weights(self):
        """Initialize (or load a ``Pretrained`` checkpoint of any supported layout); with
        ``zero_init_residual`` and the default initialization, zero the norm scales ending
        each unit."""
        super().init_weights()
        pretrained = pretrained_init(self.init_cfg) is not None
        if self.zero_init_residual and not pretrained and getattr(self, '_default_init', True):
            for unit in self.modules():
                if isinstance(unit, _ResUnit):
                    for m in unit.last_conv.modules():
                        if isinstance(m, (_BatchNorm, GroupNorm)) and m.weight is not None:
                            nn.init.constant_(m.weight, 0)

    def stage_modules(self):
        """The residual stages ``layer1``, ``layer2``, ..."""
        return [getattr(self, name) for name in self.res_layers]

    def forward_stem(self, x: Tensor) -> Tensor:
        """The stem and the max pooling."""
        return self.maxpool(self.stem(x))


@MODELS.register_module()
class ResNet(ResidualBackbone):
    """ResNet / ResNeXt backbone whose convolutions are re-parameterizable blocks.

    A drop-in for mmdet's and mmseg's ``ResNet`` (and ``ResNetV1c`` / ``ResNetV1d`` through
    ``deep_stem`` / ``avg_down``): same arguments, same outputs (a tuple of stage features),
    plus ``reparam`` and ``deploy``. Each convolution + BN is a block chosen by the official
    per-kernel-size rule (:func:`mmreparam.models.layers.factory.reparam_block_type`); as in
    the official OREPA / DBB ResNets, BasicBlock shortcuts stay plain :class:`ConvBN`. The
    stem is one module named ``stem``, so
    ``paramwise_cfg=dict(custom_keys={'backbone.stem': dict(lr_mult=...)})`` reaches it.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        reparam (str | dict): 'base', 'ACB', 'DBB', 'OREPA', 'RepVGG', 'QARepVGG' or
            'OREPA_VGG', or a dict with that ``type`` and arguments of its block, e.g.
            ``dict(type='DBB', internal_channels_1x1_3x3=32)``. Defaults to 'OREPA'.
        in_channels (int): Input channels. Defaults to 3.
        stem_channels (int, optional): Stem width; None gives ``base_channels``.
        base_channels (int): Width of the first stage. Defaults to 64.
        num_stages (int): 1 to 4. Defaults to 4.
        strides (Sequence[int]): Stride of each stage. Defaults to (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        out_indices (int | Sequence[int]): Stages whose outputs are returned; negative ones
            count from the last.
            Defaults to (0, 1, 2, 3).
        style (str): 'pytorch' (stride on the 3x3) or 'caffe'. Defaults to 'pytorch'.
        deep_stem (bool): Three 3x3 convolutions instead of the 7x7. Defaults to False.
        avg_down (bool): Average-pool in the shortcut before its 1x1. Defaults to False.
        contract_dilation (bool): Halve the dilation of the first unit of a dilated
            stage (mmseg). Defaults to False.
        multi_grid (Sequence[int], optional): The dilations of the units of the last stage,
            one per unit, in place of ``dilations[-1]`` (mmseg's ``multi_grid``; it wins
            over ``contract_dilation`` there). Defaults to None.
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem). Defaults to -1.
        conv_cfg (dict, optional): Convolution config. ``reparam='base'`` builds every
            convolution with it (mmcv's ``build_conv_layer``: ConvWS, ...; then nothing
            folds); the re-param blocks build their own ``nn.Conv2d`` and take only None or
            ``dict(type='Conv2d')``. Defaults to None.
        norm_cfg (dict): Any BatchNorm (BN, SyncBN); with ``reparam='base'`` any norm mmcv's
            ``build_norm_layer`` knows (GN, ...; only BatchNorms fold). Defaults to
            ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep BNs in eval mode while training. Defaults to True.
        dcn (dict, optional): Deformable conv config for the 3x3 of the chosen stages
            (these stay plain conv + BN), in mmdet's form: ``fallback_on_stride=True``
            keeps the re-param 3x3 there, as mmdet keeps its plain one. Defaults to None.
        stage_with_dcn (Sequence[bool]): Stages using ``dcn``.
        plugins (list[dict], optional): mmdet's plugins of the Bottleneck units (depth >= 50):
            ``dict(cfg=dict(type='ContextBlock' | 'GeneralizedAttention' | 'NonLocal2d' |
            ..., ...), position='after_conv1' | 'after_conv2' | 'after_conv3',
            stages=None | one bool per stage)``, built with mmcv's ``build_plugin_layer``
            (see :class:`Bottleneck`); they stay as they are after a fold. Defaults to None.
        with_cp (bool): Gradient checkpointing of each unit. Defaults to False.
        zero_init_residual (bool): Zero the norm scales of each unit's last block, so units
            start as identities; as in mmdet, only with the default initialization (no
            ``init_cfg``, no ``pretrained``). Defaults to True.
        groups (int): ResNeXt cardinality. Defaults to 1.
        base_width (int): ResNeXt width per group. Defaults to 4.
        deploy (bool): Build the folded structure. Defaults to False.
        pretrained (str, optional): Deprecated; use ``init_cfg``.
        init_cfg (dict | list[dict], optional): Initialization config.
    """
    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self,
                 depth: int,
                 reparam: Union[str, dict] = 'OREPA',
                 in_channels: int = 3,
                 stem_channels: Optional[int] = None,
                 base_channels: int = 64,
                 num_stages: int = 4,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 style: str = 'pytorch',
                 deep_stem: bool = False,
                 avg_down: bool = False,
                 contract_dilation: bool = False,
                 multi_grid: Optional[Sequence[int]] = None,
                 frozen_stages: int = -1,
                 conv_cfg: OptConfigType = None,
                 norm_cfg: ConfigType = dict(type='BN', requires_grad=True),
                 norm_eval: bool = True,
                 dcn: OptConfigType = None,
                 stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 plugins: Optional[Sequence[dict]] = None,
                 with_cp: bool = False,
                 zero_init_residual: bool = True,
                 groups: int = 1,
                 base_width: int = 4,
                 deploy: bool = False,
                 pretrained: Optional[str] = None,
                 init_cfg: OptConfigType = None):
        if init_cfg and pretrained:
            raise ValueError('init_cfg and pretrained cannot be specified at the same time')
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f'pretrained must be a checkpoint path (str) or None, got '
                            f'{type(pretrained).__name__}')
        # As mmdet: zero_init_residual applies to the default initialization only.
        default_init = init_cfg is None and pretrained is None
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        elif init_cfg is None:
            init_cfg = [
                dict(type='Kaiming', layer='Conv2d'),
                dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])
            ]
        super().__init__(init_cfg)
        self._default_init = default_init
        if depth not in self.arch_settings:
            raise ValueError(f'invalid depth {depth} for ResNet; choose one of '
                             f'{sorted(self.arch_settings)}')
        self.reparam = check_reparam(reparam)
        if not 1 <= num_stages <= 4:
            raise ValueError(f'num_stages must be 1 to 4, got {num_stages}')
        check_per_stage(num_stages, strides=strides, dilations=dilations)
        out_indices = check_out_indices(out_indices, num_stages)
        if style not in ('pytorch', 'caffe'):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        check_conv_cfg(reparam, conv_cfg)
        plugins = check_plugins(plugins, num_stages)
        if dcn is not None:
            check_per_stage(num_stages, stage_with_dcn=stage_with_dcn)
        block, stage_blocks = self.arch_settings[depth]
        if plugins and block is BasicBlock:
            raise ValueError(f'plugins need Bottleneck units (depth >= 50), as in mmdet; '
                             f'depth {depth} has BasicBlocks')
        if multi_grid is not None and len(multi_grid) != stage_blocks[num_stages - 1]:
            raise ValueError(f'multi_grid {tuple(multi_grid)} needs one dilation per unit of '
                             f'the last stage ({stage_blocks[num_stages - 1]} units)')
        self.depth = depth
        self.stem_channels = stem_channels or base_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides = strides
        self.dilations = dilations
        self.out_indices = out_indices
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self.plugins = plugins
        self.multi_grid = multi_grid
        self._built_deploy = deploy
        self.block = block

        self._make_stem_layer(in_channels, self.stem_channels)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = self.stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(stage_blocks[:num_stages]):
            planes = base_channels * 2**i
            unit_dilations = self._unit_dilations(
                num_blocks, dilations[i], contract_dilation,
                multi_grid if i == num_stages - 1 else None)
            layer = self._make_res_layer(
                inplanes, planes, num_blocks, strides[i], unit_dilations,
                dcn=dcn if dcn is not None and stage_with_dcn[i] else None,
                plugins=stage_plugins(plugins, i),
                groups=groups, base_width=base_width if groups > 1 else
                (64 if self.block is BasicBlock else 4))
            inplanes = planes * self.block.expansion
            self.add_module(f'layer{i + 1}', layer)
            self.res_layers.append(f'layer{i + 1}')
        self.feat_dim = inplanes
        self._freeze_stages()

    def _conv(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1,
              act=True, reparam=None):
        return build_reparam_conv(reparam or self.reparam, in_channels, out_channels,
                                  kernel_size, stride, dilation, groups,
                                  norm_cfg=self.norm_cfg, act_cfg=RELU if act else None,
                                  deploy=self._built_deploy, conv_cfg=self.conv_cfg)

    def _make_stem_layer(self, in_channels: int, stem_channels: int):
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                self._conv(in_channels, half, 3, stride=2), self._conv(half, half, 3),
                self._conv(half, stem_channels, 3))
        else:
            self.stem = self._conv(in_channels, stem_channels, 7, stride=2)

    @staticmethod
    def _unit_dilations(num_blocks: int, dilation: int, contract_dilation: bool,
                        multi_grid: Optional[Sequence[int]]) -> List[int]:
        """The dilation of each unit of a stage, as mmseg's ``ResLayer``: ``multi_grid`` if
        given, else ``dilation`` (halved for the first unit with ``contract_dilation``)."""
        if multi_grid is not None:
            return list(multi_grid)
        first = dilation // 2 if contract_dilation and dilation > 1 else dilation
        return [first] + [dilation] * (num_blocks - 1)

    def _make_res_layer(self, inplanes, planes, num_blocks, stride, dilations, dcn, plugins,
                        groups, base_width) -> Sequential:
        out_channels = planes * self.block.expansion
        downsample = None
        if stride != 1 or inplanes != out_channels:
            # The official OREPA/DBB ResNets keep BasicBlock shortcuts plain ConvBN.
            reparam = 'base' if self.block is BasicBlock else self.reparam
            layers = []
            conv_stride = stride
            if self.avg_down and stride != 1:
                conv_stride = 1
                layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True,
                                           count_include_pad=False))
            layers.append(self._conv(inplanes, out_channels, 1, conv_stride, act=False,
                                     reparam=reparam))
            downsample = nn.Sequential(*layers)
        units = []
        for i in range(num_blocks):
            units.append(
                self.block(inplanes if i == 0 else out_channels, planes, self.reparam,
                           stride=stride if i == 0 else 1, dilation=dilations[i],
                           downsample=downsample if i == 0 else None, style=self.style,
                           with_cp=self.with_cp, norm_cfg=self.norm_cfg, dcn=dcn,
                           deploy=self._built_deploy, groups=groups, base_width=base_width,
                           conv_cfg=self.conv_cfg, plugins=plugins or None))
        # mmengine's Sequential, as mmdet's ResLayer: init_weights() reaches the units, and
        # through them the plugins' and DCNs' own init_weights().
        return Sequential(*units)


__all__ = ['ResNet', 'BasicBlock', 'Bottleneck']
