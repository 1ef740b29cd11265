"""``mmreparam.RepVGG``: RepVGG (Ding et al., CVPR 2021) with RepVGG or OREPA-VGG blocks."""
from typing import Sequence, Union

import torch.nn as nn
import torch.utils.checkpoint as cp
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType
from ..layers import RepVGGBlock
from ..layers.factory import REPARAM_TYPES
from .base import ReparamBackbone

_GROUPED_LAYERS = tuple(range(2, 27, 2))  # the official "optional_groupwise_layers"
G2 = {layer: 2 for layer in _GROUPED_LAYERS}
G4 = {layer: 4 for layer in _GROUPED_LAYERS}


def _arch(num_blocks, width_factor, group_layer_map=None, use_se=False):
    return dict(num_blocks=num_blocks, width_factor=width_factor,
                group_layer_map=group_layer_map, use_se=use_se)


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

    Layout and names follow mmpretrain's RepVGG (``stem``, ``stage_1`` ... ``stage_4``).

    Args:
        arch (str | dict): One of :attr:`arch_settings` ('A0', 'A1', 'A2', 'B0', 'B1',
            'B1g2', 'B1g4', 'B2', 'B2g2', 'B2g4', 'B3', 'B3g2', 'B3g4', 'D2se'), or a dict
            with ``num_blocks``, ``width_factor`` and optionally ``group_layer_map`` (layer
            index from 1 -> groups), ``use_se`` and ``stem_channels`` (default
            ``min(64, base_channels * width_factor[0])``), as in mmpretrain.
        reparam (str): 'RepVGG', 'QARepVGG' or 'OREPA_VGG' (the ``reparam`` values whose
            block is a RepVGG block). Defaults to 'RepVGG'.
        in_channels (int): Input channels. Defaults to 3.
        base_channels (int): Width before the width factors. Defaults to 64.
        out_indices (Sequence[int]): Stages whose outputs are returned. Defaults to (3, ).
        strides (Sequence[int]): Stride of each stage. Defaults to (2, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem). Defaults to -1.
        norm_cfg (dict): Any BatchNorm. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation of every block. Defaults to ``dict(type='ReLU')``.
        with_cp (bool): Gradient checkpointing of each block. Defaults to False.
        norm_eval (bool): Keep BNs in eval mode while training. Defaults to False.
        deploy (bool): Build the folded structure. Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization config.
    """
    arch_settings = {
        'A0': _arch([2, 4, 14, 1], [0.75, 0.75, 0.75, 2.5]),
        'A1': _arch([2, 4, 14, 1], [1, 1, 1, 2.5]),
        'A2': _arch([2, 4, 14, 1], [1.5, 1.5, 1.5, 2.75]),
        'B0': _arch([4, 6, 16, 1], [1, 1, 1, 2.5]),
        'B1': _arch([4, 6, 16, 1], [2, 2, 2, 4]),
        'B1g2': _arch([4, 6, 16, 1], [2, 2, 2, 4], G2),
        'B1g4': _arch([4, 6, 16, 1], [2, 2, 2, 4], G4),
        'B2': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5]),
        'B2g2': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5], G2),
        'B2g4': _arch([4, 6, 16, 1], [2.5, 2.5, 2.5, 5], G4),
        'B3': _arch([4, 6, 16, 1], [3, 3, 3, 5]),
        'B3g2': _arch([4, 6, 16, 1], [3, 3, 3, 5], G2),
        'B3g4': _arch([4, 6, 16, 1], [3, 3, 3, 5], G4),
        'D2se': _arch([8, 14, 24, 1], [2.5, 2.5, 2.5, 5], use_se=True),
    }
    block_types = {name: block for name, block in REPARAM_TYPES.items()
                   if issubclass(block, RepVGGBlock)}

    def __init__(self,
                 arch: Union[str, dict] = 'A0',
                 reparam: str = 'RepVGG',
                 in_channels: int = 3,
                 base_channels: int = 64,
                 out_indices: Sequence[int] = (3, ),
                 strides: Sequence[int] = (2, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 frozen_stages: int = -1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 with_cp: bool = False,
                 norm_eval: bool = False,
                 deploy: bool = False,
                 init_cfg: OptConfigType = [
                     dict(type='Kaiming', layer=['Conv2d']),
                     dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm'])
                 ]):
        super().__init__(init_cfg)
        arch = self._check_arch(arch)
        if reparam not in self.block_types:
            raise ValueError(f'unknown reparam {reparam!r} for RepVGG; choose one of '
                             f'{sorted(self.block_types)}')
        num_stages = len(arch['num_blocks'])
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError('strides and dilations need one value per stage')
        if not out_indices or max(out_indices) >= num_stages:
            raise ValueError(f'out_indices {tuple(out_indices)} must be stages < {num_stages}')
        self.arch = arch
        self.reparam = reparam
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._built_deploy = deploy
        block_type = self.block_types[reparam]
        group_map = arch['group_layer_map'] or {}

        def block(cin, cout, stride=1, dilation=1, groups=1):
            return block_type(cin, cout, 3, stride=stride, dilation=dilation, groups=groups,
                              norm_cfg=norm_cfg, act_cfg=act_cfg, deploy=deploy,
                              use_se=arch['use_se'])

        channels = arch.get('stem_channels') or min(64,
                                                    int(base_channels * arch['width_factor'][0]))
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
        self._freeze_stages()

    def _check_arch(self, arch) -> dict:
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'unknown RepVGG arch {arch!r}; choose one of '
                                 f'{list(self.arch_settings)}')
            return self.arch_settings[arch]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        missing = {'num_blocks', 'width_factor'} - set(arch)
        if missing:
            raise ValueError(f'arch dict misses {sorted(missing)}')
        if len(arch['num_blocks']) != len(arch['width_factor']):
            raise ValueError('arch num_blocks and width_factor must have the same length')
        if arch.get('se_cfg') is not None:
            raise ValueError("arch se_cfg is not supported: mmreparam.RepVGG's SE is the "
                             "official RepVGG-D2se one, chosen with arch use_se=True")
        unknown = set(arch) - {'num_blocks', 'width_factor', 'group_layer_map', 'use_se',
                               'stem_channels', 'se_cfg'}
        if unknown:
            raise ValueError(f'unknown arch keys {sorted(unknown)}')
        layers = sum(arch['num_blocks'])
        beyond = sorted(k for k in (arch.get('group_layer_map') or {}) if not 1 <= k <= layers)
        if beyond:
            raise ValueError(f'arch group_layer_map names layers {beyond}, but the stages have '
                             f'layers 1 to {layers}')
        return dict(dict(group_layer_map=None, use_se=False, stem_channels=None), **arch)

    def stage_modules(self):
        """The stages ``stage_1``, ``stage_2``, ..."""
        return [getattr(self, name) for name in self.stages]
