"""``mmreparam.RepVGG``: RepVGG (Ding et al., CVPR 2021) with RepVGG or OREPA-VGG blocks.

A drop-in for mmpretrain's ``RepVGG``: the same arch table (``yolox-pai-small`` included),
the same arch-dict keys (``stem_channels``, ``se_cfg``, ``group_layer_map``) and the same
constructor arguments (``add_ppf``, ``conv_cfg``, ...), plus ``reparam`` to choose the block.
"""
import inspect
from typing import Mapping, Sequence, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from ..layers import RepVGGBlock
from ..layers.factory import ReparamTypes, is_plain_conv_cfg, parse_reparam
from ..layers.se import SELayer, make_divisible  # noqa: F401 - make_divisible: its old place
from .base import ReparamBackbone, check_out_indices, check_per_stage

_GROUPED_LAYERS = tuple(range(2, 27, 2))  # the official "optional_groupwise_layers"
G2 = {layer: 2 for layer in _GROUPED_LAYERS}
G4 = {layer: 4 for layer in _GROUPED_LAYERS}

#: The SE of the official RepVGG-D2se (``channels // 16`` squeezed), as an ``se_cfg``.
OFFICIAL_SE_CFG = dict(ratio=16, divisor=1)


def _arch(num_blocks, width_factor, group_layer_map=None, se_cfg=None, **extra):
    return dict(num_blocks=num_blocks, width_factor=width_factor,
                group_layer_map=group_layer_map, se_cfg=se_cfg, **extra)


class MTSPPF(BaseModule):
    """The pooling module after the last stage of YOLOX-PAI's RepVGG (``add_ppf``).

    mmpretrain's ``MTSPPF`` (same names, so its checkpoints load as they are): a 1x1
    ConvModule to half the channels, three chained max-poolings, and a 1x1 ConvModule on
    the concatenation of the four. It is not re-parameterized (nor is it in mmpretrain): its
    convolutions keep their norm layers after a fold.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        norm_cfg (dict): Config of the norm layers. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Config of the activations. Defaults to ``dict(type='ReLU')``.
        kernel_size (int): Kernel size of the max-pooling. Defaults to 5.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 kernel_size: int = 5):
        super().__init__()
        hidden_channels = in_channels // 2
        self.conv1 = ConvModule(in_channels, hidden_channels, 1, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.conv2 = ConvModule(hidden_channels * 4, out_channels, 1, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.maxpool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        """conv1, then conv2 on ``[x, pool(x), pool^2(x), pool^3(x)]``."""
        x = self.conv1(x)
        y1 = self.maxpool(x)
        y2 = self.maxpool(y1)
        return self.conv2(torch.cat([x, y1, y2, self.maxpool(y2)], 1))


class _CheckpointedSequential(nn.Sequential):
    """A stage whose blocks are gradient-checkpointed in training when ``with_cp``."""

    def __init__(self, *blocks, with_cp: bool = False):
        super().__init__(*blocks)
        self.with_cp = with_cp

    def forward(self, x: Tensor) -> Tensor:
        """Run the blocks in turn."""
        for block in self:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@MODELS.register_module()
class RepVGG(ReparamBackbone):
    """RepVGG backbone: a stem block and four stages of RepVGG (or OREPA-VGG) blocks.

    Layout, names and arguments follow mmpretrain's RepVGG (``stem``, ``stage_1`` ...
    ``stage_4``, ``ppf``); the blocks keep the official RepVGG's names (``rbr_dense``,
    ``rbr_1x1``, ``rbr_identity``, ``se``; ``reparam_conv`` when folded), and mmpretrain's
    checkpoints load through ``init_cfg=dict(type='Pretrained', ...)``, which renames them.

    Args:
        arch (str | dict): One of :attr:`arch_settings` ('A0', 'A1', 'A2', 'B0', 'B1',
            'B1g2', 'B1g4', 'B2', 'B2g2', 'B2g4', 'B3', 'B3g2', 'B3g4', 'D2se',
            'yolox-pai-small'), or a dict as in mmpretrain, with:

            - **num_blocks** (Sequence[int]): Blocks of each stage.
            - **width_factor** (Sequence[float]): Width multiplier of each stage.
            - **group_layer_map** (dict, optional): Layer index (from 1, the stem not
              counted) -> groups of that block.
            - **se_cfg** (dict, optional): The SE of every block (:class:`SELayer`'s
              arguments, as mmpretrain's ``SELayer``: ``ratio``, ``divisor``,
              ``act_cfg``, ...); 'D2se' has ``dict(ratio=16, divisor=1)``.
            - **use_se** (bool, optional): The official RepVGG's switch for the same SE:
              True means ``se_cfg=dict(ratio=16, divisor=1)``. Give one of the two.
            - **stem_channels** (int, optional): The stem width is
              ``min(stem_channels, int(base_channels * width_factor[0]))``; 64 if unset.

        reparam (str | dict): 'RepVGG', 'QARepVGG' or 'OREPA_VGG' (the ``reparam`` values
            whose block is a RepVGG block), or a dict with that ``type`` and arguments of its
            block (``dict(type='RepVGG', use_se=True)``). Defaults to 'RepVGG'.
        in_channels (int): Input channels. Defaults to 3.
        base_channels (int): Width before the width factors. Defaults to 64.
        out_indices (int | Sequence[int]): Stages whose outputs are returned; negative
            indices count from the last stage. Defaults to (3, ).
        strides (Sequence[int]): Stride of the first block of each stage.
            Defaults to (2, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem). Defaults to -1.
        conv_cfg (dict, optional): None or a plain convolution (``dict(type='Conv2d')``):
            a RepVGG block folds into one ``nn.Conv2d``, so no other conv type is
            accepted. Defaults to None.
        norm_cfg (dict): Any BatchNorm. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation of every block. Defaults to ``dict(type='ReLU')``.
        with_cp (bool): Gradient checkpointing of each block. Defaults to False.
        norm_eval (bool): Keep BNs in eval mode while training. Defaults to False.
        deploy (bool): Build the folded structure. Defaults to False.
        add_ppf (bool): Add :class:`MTSPPF` (named ``ppf``) after the last stage, as
            YOLOX-PAI does; its output replaces the last stage's. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config. Defaults to Kaiming
            for the convolutions and 1 for the norm layers, as in mmpretrain.
    """
    arch_settings = {
        'A0': _arch([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5]),
        'A1': _arch([2, 4, 14, 1], [1, 1, 1, 2.5]),
        'A2': _arch([2, 4, 14, 1], [1.5, 1.5, 1.5, 2.75]),
        'B0': _arch([4, 6, 16, 1], [1, 1, 1, 2.5], stem_channels=64),
        'B1': _arch([4, 6, 16, 1], [2, 2, 2, 4]),
        'B1g2': _arch([4, 6, 16, 1], [2, 2, 2, 4], G2),
        'B1g4': _arch([4, 6, 16, 1], [2, 2, 2, 4], G4),
        'B2': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5]),
        'B2g2': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5], G2),
        'B2g4': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5], G4),
        'B3': _arch([4, 6, 16, 1], [3, 3, 3, 5]),
        'B3g2': _arch([4, 6, 16, 1], [3, 3, 3, 5], G2),
        'B3g4': _arch([4, 6, 16, 1], [3, 3, 3, 5], G4),
        'D2se': _arch([8, 14, 24, 1], [2.5, 2.5, 2.5, 5], se_cfg=OFFICIAL_SE_CFG),
        'yolox-pai-small': _arch([3, 5, 7, 3], [1, 1, 1, 1], stem_channels=32),
    }
    #: The block types by ``reparam`` name: every ``REPARAM_TYPES`` entry whose block is a
    #: :class:`RepVGGBlock`, read on use (a block type registered later is one). RepOptVGG's
    #: forms replace it with tables of their own.
    block_types: Mapping[str, type] = ReparamTypes(RepVGGBlock)
    _arch_keys = ('num_blocks', 'width_factor', 'group_layer_map', 'se_cfg', 'use_se',
                  'stem_channels')

    def __init__(self,
                 arch: Union[str, dict] = 'A0',
                 reparam: Union[str, dict] = 'RepVGG',
                 in_channels: int = 3,
                 base_channels: int = 64,
                 out_indices: Union[int, Sequence[int]] = (3, ),
                 strides: Sequence[int] = (2, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 frozen_stages: int = -1,
                 conv_cfg: OptConfigType = None,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 with_cp: bool = False,
                 norm_eval: bool = False,
                 deploy: bool = False,
                 add_ppf: bool = False,
                 init_cfg: OptConfigType = [
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])
                 ]):
        super().__init__(init_cfg)
        arch = self._check_arch(arch)
        name, block_args = parse_reparam(reparam, self.block_types)
        num_stages = len(arch['num_blocks'])
        check_per_stage(num_stages, strides=strides, dilations=dilations)
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'frozen_stages must be -1 (none) to {num_stages} (all), got '
                             f'{frozen_stages!r}')
        self._check_conv_cfg(conv_cfg)
        self.arch = arch
        self.reparam = reparam
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.out_indices = check_out_indices(out_indices, num_stages)
        self.strides = strides
        self.dilations = dilations
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.with_cp = with_cp
        self.norm_eval = norm_eval
        self._built_deploy = deploy
        block_type = self.block_types[name]
        group_map = arch['group_layer_map'] or {}

        def block(cin, cout, stride=1, dilation=1, groups=1):
            module = block_type(cin, cout, 3, stride=stride, dilation=dilation,
                                groups=groups, norm_cfg=norm_cfg, act_cfg=act_cfg,
                                deploy=deploy, **block_args)
            if arch['se_cfg'] is not None:
                module.se = SELayer(cout, **arch['se_cfg'])
            return module

        # As mmpretrain: 64 by default, and never wider than the first stage.
        channels = min(arch['stem_channels'] or 64, int(base_channels * arch['width_factor'][0]))
        self.stem = block(in_channels, channels, stride=2)
        layer_idx = 1
        self.stages = []
        for i, num_blocks in enumerate(arch['num_blocks']):
            out_channels = int(base_channels * 2**i * arch['width_factor'][i])
            blocks = []
            for j in range(num_blocks):
                blocks.append(block(channels, out_channels, strides[i] if j == 0 else 1,
                                    dilations[i], group_map.get(layer_idx, 1)))
                channels = out_channels
                layer_idx += 1
            self.add_module(f'stage_{i + 1}', _CheckpointedSequential(*blocks,
                                                                      with_cp=with_cp))
            self.stages.append(f'stage_{i + 1}')
        if add_ppf:
            self.ppf = MTSPPF(channels, channels, norm_cfg=norm_cfg, act_cfg=act_cfg,
                              kernel_size=5)
        else:
            self.ppf = nn.Identity()
        self._freeze_stages()

    def _check_arch(self, arch) -> dict:
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'unknown RepVGG arch {arch!r}; choose one of '
                                 f'{list(self.arch_settings)}')
            arch = self.arch_settings[arch]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        missing = [key for key in ('num_blocks', 'width_factor') if key not in arch]
        if missing:
            raise ValueError(f'arch dict misses {missing}')
        unknown = sorted(set(arch) - set(self._arch_keys))
        if unknown:
            raise ValueError(f'unknown arch keys {unknown}; RepVGG takes '
                             f'{list(self._arch_keys)}')
        if len(arch['num_blocks']) != len(arch['width_factor']):
            raise ValueError('arch num_blocks and width_factor must have the same length')
        layers = sum(arch['num_blocks'])
        beyond = sorted(k for k in (arch.get('group_layer_map') or {}) if not 1 <= k <= layers)
        if beyond:
            raise ValueError(f'arch group_layer_map names layers {beyond}, but the stages have '
                             f'layers 1 to {layers}')
        se_cfg = arch.get('se_cfg')
        if se_cfg is not None and not isinstance(se_cfg, dict):
            raise TypeError(f'arch se_cfg must be a dict or None, got {type(se_cfg).__name__}')
        se_keys = list(inspect.signature(SELayer).parameters)[1:]  # all but channels
        unknown = sorted(set(se_cfg or {}) - set(se_keys))
        if unknown:
            raise ValueError(f'unknown arch se_cfg keys {unknown}; SELayer takes {se_keys}')
        if arch.get('use_se') and se_cfg is not None:
            raise ValueError('arch has both use_se and se_cfg: give one (use_se=True is '
                             f'se_cfg={OFFICIAL_SE_CFG})')
        if arch.get('use_se'):
            se_cfg = OFFICIAL_SE_CFG
        checked = {key: arch.get(key) for key in self._arch_keys if key != 'use_se'}
        return dict(checked, se_cfg=None if se_cfg is None else dict(se_cfg))

    @staticmethod
    def _check_conv_cfg(conv_cfg) -> None:
        if not is_plain_conv_cfg(conv_cfg):
            raise ValueError(f'conv_cfg {dict(conv_cfg)} is not supported: RepVGG blocks fold '
                             "into one nn.Conv2d; use None or dict(type='Conv2d')")

    def stage_modules(self):
        """The stages ``stage_1``, ``stage_2``, ..."""
        return [getattr(self, name) for name in self.stages]

    def forward(self, x: Tensor) -> tuple:
        """Return the features of the stages in ``out_indices``; ``ppf`` (:class:`MTSPPF`
        with ``add_ppf``, else the identity) follows the last stage, as in mmpretrain."""
        with self._generation():
            x = self.forward_stem(x)
            outs = []
            stages = self.stage_modules()
            for i, stage in enumerate(stages):
                x = stage(x)
                if i == len(stages) - 1:
                    x = self.ppf(x)
                if i in self.out_indices:
                    outs.append(x)
        return tuple(outs)
