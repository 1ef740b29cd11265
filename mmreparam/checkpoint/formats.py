"""Recognising a checkpoint's layout (and the ``reparam`` of its blocks) from its keys.

The blocks of a layout are recognised through the blocks' own
:attr:`~mmreparam.models.layers.ReparamBlock.state_markers`, after the official names are
mapped to mmreparam's (:func:`~.layouts.official_block_key`): renaming a branch in a block
changes its markers with it.
"""
import re
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Tuple

from torch import Tensor

from ..models.layers.base import block_types
from ..models.layers.factory import reparam_of_block_type
from .layouts import OFFICIAL_DEPLOY_CONVS, official_block_key

#: BatchNorm eps of the official and torchvision networks (PyTorch's default).
SOURCE_BN_EPS = 1e-5

_PLAIN_KEY = re.compile(r'^(conv1\.weight|layer\d+\.\d+\.conv\d\.weight|stem\.\d+\.weight)$')
# Every key of a plain ResNet (torchvision / mmdet / mmpretrain), for the share of keys.
_PLAIN_LAYOUT = re.compile(r'^((conv1|bn1|fc)\.[a-z_]+|stem\.\d+\.([a-z_]+|(conv|bn)\.[a-z_]+)|'
                           r'layer\d+\.\d+\.((conv|bn)\d|downsample\.\d+)\.[a-z_]+)$')
_OFFICIAL_LAYOUT = re.compile(r'^(stage\d+|linear)\.')
_MMPRETRAIN_PARTS = {'branch_3x3', 'branch_1x1', 'branch_norm', 'branch_reparam'}
_MMPRETRAIN_KEY_PARTS = _MMPRETRAIN_PARTS | {'se_layer'}  # every key of a block has one
# The RepMLP units of the official RepMLP-ResNet (DingXiaoH/RepMLP ``repmlp_blocks.py``).
_OFFICIAL_REPMLP_UNIT = re.compile(r'^stage\d+\.\d+\.(light|btnk)_repmlp\.')
_OFFICIAL_REPMLP_KINDS = {'light': 'Light', 'btnk': 'Bottleneck'}


@dataclass
class CheckpointFormat:
    """What :func:`detect_format` recognised.

    Attributes:
        name (str): 'mmreparam', 'official_resnet', 'official_repvgg',
            'official_repmlp_resnet', 'mmpretrain_repvgg', 'plain_resnet', 'timm_repvgg',
            'timm_resnet_d', or 'unknown' (a
            layout of another code base that mmreparam cannot rename; the description says
            what it looks like).
        description (str): Human-readable, e.g. "official OREPA ResNet (train)".
        reparam (str, optional): The ``reparam`` of mmreparam that matches the checkpoint's
            blocks, None when it does not tell (plain or deploy checkpoints).
        bn_eps (float, optional): BatchNorm eps of the network that produced it; None for
            mmreparam's own checkpoints (the model's ``norm_cfg`` applies).
        folded (bool, optional): True for a deploy-form checkpoint (folded blocks only),
            False for a train-form one, None when it has both or does not tell.
    """
    name: str
    description: str
    reparam: Optional[str] = None
    bn_eps: Optional[float] = SOURCE_BN_EPS
    folded: Optional[bool] = None


def _has(keys, *markers) -> bool:
    return any(marker in key for key in keys for marker in markers)


def _most(keys: List[str], is_of_layout) -> bool:
    """Whether most keys are of a layout: a few look-alike keys (a stray ``conv1.weight``
    in an mmreparam checkpoint) must not switch the detection."""
    return sum(bool(is_of_layout(key)) for key in keys) * 2 > len(keys)


def _mode(train: bool, deploy: bool) -> str:
    return 'train and deploy' if train and deploy else 'deploy' if deploy else 'train'


def _folded(train: bool, deploy: bool) -> Optional[bool]:
    return None if train == deploy else deploy


def train_blocks(keys: Iterable[str]) -> List[Tuple[str, type]]:
    """``(key prefix, block type)`` of each outermost train-time block named in ``keys``
    (mmreparam names), recognised by the block types' ``state_markers``."""
    keys = list(keys)
    keyset = set(keys)
    best = {}  # prefix -> the most specific type whose markers are all under it
    for block_type in block_types():
        first = block_type.state_markers[0]
        for key in keys:
            if key != first and not key.endswith('.' + first):
                continue
            prefix = key[:len(key) - len(first)]
            if all(prefix + marker in keyset for marker in block_type.state_markers) and (
                    prefix not in best
                    or len(block_type.state_markers) > len(best[prefix].state_markers)):
                best[prefix] = block_type
    return [(prefix, block_type) for prefix, block_type in best.items()
            if not any(prefix != outer and prefix.startswith(outer) for outer in best)]


def blocks_reparam(keys: Iterable[str]) -> Optional[str]:
    """The ``reparam`` of the train-time blocks in ``keys``: the one non-``base`` value
    their types belong to (``'base'`` when all are plain); None when there are none or they
    belong to several."""
    found = {reparam_of_block_type(block_type) for _, block_type in train_blocks(keys)}
    found.discard(None)
    if len(found) > 1:
        found.discard('base')
    return found.pop() if len(found) == 1 else None


def _official_reparam(keys: List[str]) -> Tuple[Optional[str], bool]:
    """The ``reparam`` of an official checkpoint's blocks, and whether it has deploy convs."""
    names = {part for key in keys for part in key.split('.')}
    deployed = {OFFICIAL_DEPLOY_CONVS[name] for name in names & set(OFFICIAL_DEPLOY_CONVS)}
    deploy = bool(deployed) or any(key.endswith('conv.bias') for key in keys)
    reparam = blocks_reparam(official_block_key(key) for key in keys)
    deployed.discard(None)
    if reparam in (None, 'base') and len(deployed) == 1:
        reparam = deployed.pop()
    return reparam, deploy


def _official_repmlp_resnet(keys: List[str]) -> Optional[CheckpointFormat]:
    """The official RepMLP-ResNet (a Sequential stem ``stage0.0``, RepMLP units), or None."""
    kinds = {match.group(1) for match in map(_OFFICIAL_REPMLP_UNIT.match, keys) if match}
    if 'stage0.0.conv.weight' not in keys or not kinds:
        return None
    train = _has(keys, '.bn.running_var')
    deploy = _has(keys, '.conv.bias', '.fc3.bias')
    units = ' + '.join(_OFFICIAL_REPMLP_KINDS[kind] for kind in sorted(kinds))
    return CheckpointFormat(
        'official_repmlp_resnet',
        f'official RepMLP-Res50 {units} (DingXiaoH/RepMLP repmlp_resnet.py, '
        f'{_mode(train, deploy)})', 'base', folded=_folded(train, deploy))


def _timm_format(keys: List[str]) -> Optional[CheckpointFormat]:
    """timm's RepVGG (``repvgg_*``, train or reparameterized) or ResNet-D (``resnet*d``:
    the deep stem ``conv1.0`` ... ``conv1.6``), or None."""
    keyset = set(keys)
    if keyset & {'stem.conv_kxk.conv.weight', 'stem.reparam_conv.weight'} and any(
            key.startswith('stages.') for key in keys):
        train = _has(keys, '.conv_kxk.')
        deploy = _has(keys, 'reparam_conv.')
        return CheckpointFormat('timm_repvgg',
                                f'timm RepVGG (byobnet repvgg_*, {_mode(train, deploy)})',
                                'RepVGG', folded=_folded(train, deploy))
    if {'conv1.0.weight', 'conv1.6.weight', 'bn1.running_var'} <= keyset and any(
            _PLAIN_KEY.match(key) for key in keys):
        return CheckpointFormat('timm_resnet_d',
                                'timm ResNet-D (resnet*d: deep stem conv1.0/1/3/4/6)')
    return None


def detect_format(state_dict: Mapping[str, Tensor]) -> CheckpointFormat:
    """Recognise the layout of a (prefix-stripped) state_dict.

    Args:
        state_dict (Mapping[str, Tensor]): The checkpoint's tensors.

    Returns:
        CheckpointFormat: The layout; 'mmreparam' when no other layout matches, 'unknown'
        for an official-style (``stage0.``) layout that is none of an OREPA / DBB ResNet,
        a RepMLP-ResNet and a RepVGG-style network.
    """
    keys = list(state_dict)
    if any(key.startswith('stage0.') for key in keys) and _most(keys, _OFFICIAL_LAYOUT.match):
        reparam, deploy = _official_reparam(keys)
        if any(key.startswith('stage0.conv1.') for key in keys):
            reparam = reparam or 'base'
            train = _has(keys, '.bn.running_var')
            return CheckpointFormat(
                'official_resnet',
                f'official {reparam} ResNet/ResNeXt (OREPA_CVPR2022 / DiverseBranchBlock '
                f'layout, {_mode(train, deploy)})', reparam, folded=_folded(train, deploy))
        if any(key.startswith('stage0.0.') for key in keys):  # a Sequential stem
            return _official_repmlp_resnet(keys) or CheckpointFormat(
                'unknown', f'an unknown layout with official-style keys (e.g. '
                f'{sorted(keys)[:3]}; the stem is a Sequential): neither an OREPA / DBB '
                'ResNet (stage0.conv1.*), nor a RepMLP-ResNet (stage0.0.* with '
                'stageN.M.light_repmlp.* / btnk_repmlp.* units), nor a RepVGG / OREPA-VGG / '
                'RepOpt-VGG (stage0.rbr_* / stage0.conv.*)')
        orepa = _has(keys, 'weight_rbr_')
        train = _has(keys, 'rbr_dense.')
        name = 'OREPA-VGG' if orepa else 'RepVGG' if train else 'RepVGG / OREPA-VGG'
        return CheckpointFormat('official_repvgg',
                                f'official {name} ({_mode(train, deploy)})',
                                'OREPA_VGG' if orepa else 'RepVGG',
                                folded=_folded(train, deploy))
    if any(part in _MMPRETRAIN_PARTS for key in keys for part in key.split('.')) and _most(
            keys, lambda key: any(part in _MMPRETRAIN_KEY_PARTS for part in key.split('.'))):
        train = _has(keys, 'branch_3x3.')
        deploy = _has(keys, 'branch_reparam.')
        return CheckpointFormat('mmpretrain_repvgg',
                                f'mmpretrain RepVGG ({_mode(train, deploy)})', 'RepVGG',
                                folded=_folded(train, deploy))
    timm = _timm_format(keys)
    if timm is not None:
        return timm
    if any(map(_PLAIN_KEY.match, keys)) and _most(keys, _PLAIN_LAYOUT.match):
        stem = ' with deep stem' if 'stem.0.weight' in state_dict else ''
        return CheckpointFormat('plain_resnet',
                                f'plain ResNet{stem} (torchvision / mmdet / mmpretrain layout)')
    train = _has(keys, '.bn.running_var', 'rbr_identity.', 'avgbn.')
    deploy = _has(keys, 'reparam_conv.')
    return CheckpointFormat('mmreparam', f'mmreparam ({_mode(train, deploy)})',
                            blocks_reparam(keys), bn_eps=None, folded=_folded(train, deploy))


__all__ = ['CheckpointFormat', 'SOURCE_BN_EPS', 'blocks_reparam', 'detect_format',
           'train_blocks']
