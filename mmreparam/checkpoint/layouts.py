"""The checkpoint layouts of other code bases, renamed to mmreparam's keys.

One renamer per layout: the official OREPA / DBB ResNets (``stage0.conv1`` ...), the
official RepVGG / OREPA-VGG (``stage0`` ...), the official RepMLP-ResNet (``stage0.0`` ...,
``light_repmlp`` / ``btnk_repmlp``), mmpretrain's RepVGG and plain ResNets
(torchvision / mmdet / mmpretrain). Every piece of knowledge about a foreign layout's names
lives here; what a block's own keys mean lives with the block.
"""
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import CheckpointError
from ..models.layers.fuse import identity_kernel
from ..models.layers.repmlp import RepMLPBlock
from .reading import StateDict

#: The official deploy-form conv of each block, and the ``reparam`` it comes from (None:
#: the layout tells it otherwise).
OFFICIAL_DEPLOY_CONVS = {'orepa_reparam': 'OREPA', 'or1x1_reparam': 'OREPA',
                         'or_large_reparam': 'OREPA', 'dbb_reparam': 'DBB',
                         'fused_conv': 'ACB', 'rbr_reparam': None}
_OFFICIAL_DEPLOY = tuple(OFFICIAL_DEPLOY_CONVS)

Renamed = Tuple[StateDict, List[str]]  # state_dict in mmreparam names, ignored keys

_OFFICIAL_UNIT = re.compile(r'^stage([1-9]\d*)\.(\d+)\.(conv\d|shortcut)\.(.+)$')
_OFFICIAL_VGG_UNIT = re.compile(r'^stage([1-9]\d*)\.(\d+)\.(.+)$')
# The official RepMLP-ResNet units (DingXiaoH/RepMLP ``repmlp_resnet.py``: BaseBlock,
# ``repmlp_blocks.py``: RepMLPLightBlock, RepMLPBottleneckBlock) and their RepMLP's parts.
_OFFICIAL_REPMLP_PARTS = {'light_conv1': 'conv1', 'light_repmlp': 'repmlp',
                          'light_conv3': 'conv3', 'btnk_conv1': 'conv1', 'btnk_conv2': 'conv2',
                          'btnk_repmlp': 'repmlp', 'btnk_conv4': 'conv4', 'btnk_conv5': 'conv5'}
_OFFICIAL_REPMLP_GP = {'fc1_fc2.fc1.': 'gp.fc1.', 'fc1_fc2.fc2.': 'gp.fc2.',
                       'avg.bn.': 'gp.bn.'}
_OFFICIAL_BUFFERS = {'id_tensor', 'weight_orepa_avg_avg', 'weight_orepa_prior',
                     'weight_rbr_avg_avg', 'weight_rbr_prior'}
_DEPLOY_NAME = re.compile(r'(^|\.)(' + '|'.join(_OFFICIAL_DEPLOY) + r')\.')
_PLAIN_UNIT = re.compile(r'^(layer\d+\.\d+)\.(conv|bn)(\d)\.(.+)$')
_PLAIN_DOWNSAMPLE = re.compile(r'^(layer\d+\.\d+)\.downsample\.(\d+)\.(.+)$')
# mmdet's deep stem (conv, norm, ReLU) x 3; mmpretrain's ``stem.N.conv`` / ``stem.N.bn``
# already has mmreparam's names.
_PLAIN_DEEP_STEM = re.compile(
    r'^stem\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$')


def official_block_key(key: str) -> str:
    """An official block-level key in mmreparam's names (names only, values unchanged)."""
    return _DEPLOY_NAME.sub(r'\1reparam_conv.', key).replace('weight_rbr_', 'weight_orepa_')


def _downsample_index(model: nn.Module, unit: str) -> int:
    """Index of the conv block in the model's ``unit.downsample`` (1 after an AvgPool)."""
    try:
        downsample = model.get_submodule(f'{unit}.downsample')
    except AttributeError:
        return 0
    return len(downsample) - 1 if isinstance(downsample, nn.Sequential) else 0


def _interleaved_pw_to_natural(pw: Tensor, groups: int) -> Tensor:
    """Reorder the rows of an official grouped OREPA ``gconv_pw``.

    The official ``dwsc2full`` gives output channel ``c * (O/g) + a`` the pw row
    ``a * g + c``; mmreparam uses the natural row ``c * (O/g) + a``.
    """
    out = pw.shape[0]
    per_group = out // groups
    rows = (torch.arange(per_group).reshape(1, -1) * groups
            + torch.arange(groups).reshape(-1, 1)).reshape(-1)
    return pw[rows]


def _expect_shape(key: str, value: Tensor, dim: int, what: str, valid: bool = True) -> None:
    """Refuse a tensor a renamer would index: ``dim`` dimensions and ``valid`` expected."""
    if value.dim() != dim or not valid:
        raise CheckpointError(f'{key}: expected {what}, the checkpoint has a tensor of shape '
                              f'{tuple(value.shape)}')


def _official_block_params(state: StateDict, ignored: List[str],
                           interleaved_pw: bool) -> Renamed:
    """Map the official block-level names and values to mmreparam's."""
    out = {}
    for key, value in state.items():
        if key.rsplit('.', 1)[-1] in _OFFICIAL_BUFFERS:
            ignored.append(key)
            continue
        out[official_block_key(key)] = value
    for key in [k for k in out if k == 'conv.bias' or k.endswith('.conv.bias')]:
        block = key[:-len('conv.bias')]  # an official deploy-form ConvBN
        if block + 'bn.running_var' not in out and block + 'conv.weight' in out:
            out[block + 'reparam_conv.weight'] = out.pop(block + 'conv.weight')
            out[block + 'reparam_conv.bias'] = out.pop(key)
    for key in [k for k in out if k.endswith('weight_orepa_1x1_kxk_conv1')]:
        # OREPA-VGG's plain 1x1 of the 1x1-kxk branch: ours is an offset from the identity.
        conv1 = out.pop(key)
        _expect_shape(key, conv1, 4, 'a 1x1 kernel (out, in, 1, 1)',
                      conv1.dim() == 4 and conv1.shape[2:] == (1, 1))
        out[key[:-len('conv1')] + 'idconv1'] = conv1 - identity_kernel(
            conv1.shape[0], 1, in_channels=conv1.shape[1], dtype=conv1.dtype)
    for key in [k for k in out if k.endswith('rbr_dense.vector')]:
        _expect_shape(key, out[key], 2, "OREPA-VGG's branch weights (6, out_channels)",
                      out[key].dim() == 2 and out[key].shape[0] >= 5)
        out[key] = out[key][:5]  # OREPA-VGG's 6th row is never initialised nor used
    if interleaved_pw:
        for key in [k for k in out if k.endswith('weight_orepa_gconv_pw')]:
            dw_key = key[:-len('pw')] + 'dw'
            dw = out.get(dw_key)
            _expect_shape(key, out[key], 4, 'a 1x1 kernel (out, in, 1, 1)',
                          out[key].dim() == 4 and out[key].shape[1] > 0)
            if dw is not None:
                _expect_shape(dw_key, dw, 4, 'a kernel (channels, 1, k, k)')
            groups = dw.shape[0] // out[key].shape[1] if dw is not None else 1
            _expect_shape(key, out[key], 4, f'a number of rows divisible by {groups} groups',
                          groups <= 1 or out[key].shape[0] % groups == 0)
            if groups > 1:
                out[key] = _interleaved_pw_to_natural(out[key], groups)
    return out, ignored


def _rename_official_resnet(state: StateDict, model: nn.Module) -> Renamed:
    renamed, ignored = {}, []
    for key, value in state.items():
        unit = _OFFICIAL_UNIT.match(key)
        if key.startswith('linear.'):
            ignored.append(key)
            continue
        if key.startswith('stage0.conv1.'):
            key = 'stem.' + key[len('stage0.conv1.'):]
        elif unit:
            stage, index, part, rest = unit.groups()
            name = f'layer{stage}.{index}'
            if part == 'shortcut':
                part = f'downsample.{_downsample_index(model, name)}'
            key = f'{name}.{part}.{rest}'
        renamed[key] = value
    return _official_block_params(renamed, ignored, interleaved_pw=True)


def _rename_official_repvgg(state: StateDict, model: nn.Module) -> Renamed:
    renamed, ignored = {}, []
    for key, value in state.items():
        unit = _OFFICIAL_VGG_UNIT.match(key)
        if key.startswith('linear.'):
            ignored.append(key)
            continue
        if key.startswith('stage0.'):
            key = 'stem.' + key[len('stage0.'):]
        elif unit:
            key = 'stage_{}.{}.{}'.format(*unit.groups())
        renamed[key] = value
    return _official_block_params(renamed, ignored, interleaved_pw=False)


def _official_repmlp_key(rest: str) -> str:
    """A key inside an official RepMLP in mmreparam's names: the global perceptron's
    ``fc1_fc2.fc1`` / ``fc1_fc2.fc2`` / ``avg.bn`` are ``gp.fc1`` / ``gp.fc2`` / ``gp.bn``;
    ``fc3``, ``fc3_bn`` and ``repconv{k}.conv`` / ``.bn`` keep their names."""
    for official, ours in _OFFICIAL_REPMLP_GP.items():
        if rest.startswith(official):
            return ours + rest[len(official):]
    return rest


def _check_repmlp_forms(state: StateDict, model: nn.Module,
                        source_names: Optional[Dict[str, str]] = None) -> None:
    """Refuse a checkpoint RepMLP whose form (train / deploy) is not the model's.

    The converter folds and expands conv blocks, not RepMLP units: copied by name, a RepMLP
    of the other form would leave the model's RepMLP partly unset and partly wrong.

    Args:
        state (dict): The checkpoint in mmreparam names.
        model (nn.Module): The model to load into.
        source_names (dict, optional): The checkpoint's own name of each RepMLP (by
            mmreparam name), for the message. None: the names are mmreparam's.
    """
    for name, block in model.named_modules():
        if not isinstance(block, RepMLPBlock):
            continue
        train = f'{name}.fc3_bn.weight' in state
        deploy = f'{name}.fc3.bias' in state
        if train == deploy or deploy == block.folded:
            continue
        have, want = ('train', 'deploy') if train else ('deploy', 'train')
        source = (source_names or {}).get(name, name)
        raise CheckpointError(
            f'{name}: the checkpoint has a {have}-form RepMLP here ({source}.*) and the '
            f'model a {want}-form one; RepMLP units are not converted between the forms '
            'when loading: load a train checkpoint into deploy=False (and fold it with '
            'mmreparam.fold), a deploy checkpoint into deploy=True')


def _rename_official_repmlp_resnet(state: StateDict, model: nn.Module) -> Renamed:
    renamed, ignored = {}, []
    official = {}  # mmreparam name of each RepMLP -> its official name
    for key, value in state.items():
        unit = _OFFICIAL_VGG_UNIT.match(key)
        if key.startswith('linear.'):
            ignored.append(key)
            continue
        if key.startswith('stage0.0.'):
            key = 'stem.' + key[len('stage0.0.'):]
        elif unit:
            stage, index, rest = unit.groups()
            name = f'layer{stage}.{index}'
            part, _, rest = rest.partition('.')
            if part == 'shortcut':
                ours = f'downsample.{_downsample_index(model, name)}'
            else:
                ours = _OFFICIAL_REPMLP_PARTS.get(part, part)
            if ours == 'repmlp':
                rest = _official_repmlp_key(rest)
                official[f'{name}.repmlp'] = f'stage{stage}.{index}.{part}'
            key = f'{name}.{ours}.{rest}'
        renamed[key] = value
    _check_repmlp_forms(renamed, model, official)
    return _official_block_params(renamed, ignored, interleaved_pw=False)


def _rename_mmreparam(state: StateDict, model: nn.Module) -> Renamed:
    _check_repmlp_forms(state, model)
    return dict(state), []


def _rename_mmpretrain_repvgg(state: StateDict, model: nn.Module) -> Renamed:
    names = {'branch_3x3': 'rbr_dense', 'branch_1x1': 'rbr_1x1', 'branch_norm': 'rbr_identity',
             'branch_reparam': 'reparam_conv'}
    renamed = {}
    for key, value in state.items():
        key = key.replace('se_layer.conv1.conv.', 'se.down.').replace(
            'se_layer.conv2.conv.', 'se.up.')
        parts = key.split('.')
        for i, part in enumerate(parts):
            if part == 'norm' and i and parts[i - 1] in ('rbr_dense', 'rbr_1x1'):
                parts[i] = 'bn'
            else:
                parts[i] = names.get(part, part)
        renamed['.'.join(parts)] = value
    return renamed, []


def _rename_plain_resnet(state: StateDict, model: nn.Module) -> Renamed:
    renamed, ignored = {}, []
    # The conv of each plain downsample is the entry with a 4-d weight (after an AvgPool
    # in mmdet's ResNetV1d); the norm follows it.
    conv_index = {}
    for key, value in state.items():
        down = _PLAIN_DOWNSAMPLE.match(key)
        if down and down.group(3) == 'weight' and value.dim() == 4:
            conv_index[down.group(1)] = int(down.group(2))
    for key, value in state.items():
        unit, down, stem = (_PLAIN_UNIT.match(key), _PLAIN_DOWNSAMPLE.match(key),
                            _PLAIN_DEEP_STEM.match(key))
        if key.startswith('fc.'):
            ignored.append(key)
            continue
        if key.startswith('conv1.'):
            key = 'stem.conv.' + key[len('conv1.'):]
        elif key.startswith('bn1.'):
            key = 'stem.bn.' + key[len('bn1.'):]
        elif stem and int(stem.group(1)) % 3 != 2:  # conv, norm, ReLU per stem layer
            index = int(stem.group(1))
            role = 'conv' if index % 3 == 0 else 'bn'
            key = f'stem.{index // 3}.{role}.{stem.group(2)}'
        elif unit:
            name, kind, number, rest = unit.groups()
            key = f'{name}.conv{number}.{kind}.{rest}'
        elif down and down.group(1) in conv_index:
            name, index, rest = down.group(1), int(down.group(2)), down.group(3)
            role = {conv_index[name]: 'conv', conv_index[name] + 1: 'bn'}.get(index)
            if role:
                key = f'{name}.downsample.{_downsample_index(model, name)}.{role}.{rest}'
        renamed[key] = value
    return renamed, ignored


# timm's RepVGG (``timm/models/byobnet.py`` RepVggBlock, ``repvgg_*``): stem ``stem``,
# stages ``stages.N.M``, branches ``conv_kxk`` / ``conv_1x1`` (ConvNormAct: ``conv``,
# ``bn``), ``identity`` (a BN), ``reparam_conv`` once folded, SE ``attn.fc1`` / ``attn.fc2``
# (repvgg_d2se), classifier ``head.fc``.
_TIMM_REPVGG_STAGE = re.compile(r'^stages\.(\d+)\.')
_TIMM_REPVGG_PARTS = {'conv_kxk': 'rbr_dense', 'conv_1x1': 'rbr_1x1',
                      'identity': 'rbr_identity', 'attn': 'se', 'fc1': 'down', 'fc2': 'up'}
# timm's ResNet-D deep stem (``timm/models/resnet.py``, ``stem_type='deep'``): ``conv1`` is
# a Sequential (conv, bn, ReLU) x 2 + conv, its last BN is ``bn1``.
_TIMM_DEEP_STEM = {'conv1.0.': 'stem.0.conv.', 'conv1.1.': 'stem.0.bn.',
                   'conv1.3.': 'stem.1.conv.', 'conv1.4.': 'stem.1.bn.',
                   'conv1.6.': 'stem.2.conv.', 'bn1.': 'stem.2.bn.'}


def _rename_timm_repvgg(state: StateDict, model: nn.Module) -> Renamed:
    renamed, ignored = {}, []
    for key, value in state.items():
        if key.startswith('head.'):
            ignored.append(key)
            continue
        key = _TIMM_REPVGG_STAGE.sub(lambda m: f'stage_{int(m.group(1)) + 1}.', key)
        renamed['.'.join(_TIMM_REPVGG_PARTS.get(part, part) for part in key.split('.'))] = \
            value
    return renamed, ignored


def _rename_timm_resnet_d(state: StateDict, model: nn.Module) -> Renamed:
    restemmed = {}
    for key, value in state.items():
        for timm_prefix, ours in _TIMM_DEEP_STEM.items():
            if key.startswith(timm_prefix):
                key = ours + key[len(timm_prefix):]
                break
        restemmed[key] = value
    return _rename_plain_resnet(restemmed, model)  # the stages are torchvision's


#: The renamer of each layout :func:`~.formats.detect_format` recognises.
RENAMERS: Dict[str, Callable[[StateDict, nn.Module], Renamed]] = {
    'mmreparam': _rename_mmreparam,
    'official_resnet': _rename_official_resnet,
    'official_repvgg': _rename_official_repvgg,
    'official_repmlp_resnet': _rename_official_repmlp_resnet,
    'mmpretrain_repvgg': _rename_mmpretrain_repvgg,
    'plain_resnet': _rename_plain_resnet,
    'timm_repvgg': _rename_timm_repvgg,
    'timm_resnet_d': _rename_timm_resnet_d,
}


__all__ = ['OFFICIAL_DEPLOY_CONVS', 'RENAMERS', 'official_block_key']
