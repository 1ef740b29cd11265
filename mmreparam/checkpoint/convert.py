"""Load ImageNet checkpoints of other layouts into mmreparam backbones.

:func:`load_pretrained` reads a checkpoint, recognises its layout, renames its keys to
mmreparam's and converts block by block for the model at hand:

- mmreparam's own checkpoints (train or deploy form, any ``reparam``);
- the official OREPA / DBB ResNets and ResNeXts (JUGGHM/OREPA_CVPR2022,
  DingXiaoH/DiverseBranchBlock; ``stage0.conv1`` ... ``linear``), train or deploy;
- the official RepVGG (DingXiaoH/RepVGG) and OREPA-VGG, train or deploy;
- mmpretrain's RepVGG (``branch_3x3`` / ``branch_1x1`` / ``branch_norm`` /
  ``branch_reparam``), usually a whole classifier under ``backbone.``;
- plain ResNets in torchvision / mmdet / mmpretrain layout (``conv1``, ``bn1``,
  ``layerX.Y.convK`` / ``bnK``, ``downsample``; mmdet's deep stem ``stem.0`` ... ``stem.7``).

Each block of the model is then filled in one of three ways. A checkpoint block of the same
kind is copied. A block of another kind is reduced to one kernel followed by an affine map:
single-BN blocks (conv-BN, OREPA) keep their BN; multi-branch blocks and folded convs are
folded to a kernel and a bias. That kernel is then *expanded* into the model's block so that
the block computes the same function in eval mode: the kernel goes to the origin branch
(OREPA: ``vector`` row ``origin`` = 1, others 0; DBB / ACB / RepVGG: the origin conv and its
BN, the other branches' last BN with weight 0 and bias 0), or is folded for a ``deploy=True``
model. OREPA's large-kernel stem gets two fixed, well-conditioned generators and a
least-squares solution for the last one. The fold and expansion math runs in float64.

Whatever does not match is logged key by key; a checkpoint that matches too little of the
model (wrong architecture) raises :class:`CheckpointError`.
"""
import copy
import logging
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import product
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers import (
    ACB,
    DBB,
    OREPA,
    ConvBN,
    OREPA1x1,
    OREPALargeConv,
    OREPAVGGBlock,
    ReparamBlock,
    RepVGGBlock,
)
from ..models.layers.fuse import compose_kernels, identity_kernel
from .safe_load import CheckpointError, safe_load

#: BatchNorm eps of the official and torchvision networks (PyTorch's default).
SOURCE_BN_EPS = 1e-5
#: A load fails when less than this fraction of the model's tensors, or of the
#: checkpoint's backbone tensors, is used.
MIN_MATCHED_FRACTION = 0.5
#: Largest relative error accepted when solving the large-kernel generators.
_LARGE_CONV_TOLERANCE = 1e-9

StateDict = Dict[str, Tensor]


@dataclass
class CheckpointFormat:
    """What :func:`detect_format` recognised.

    Attributes:
        name (str): 'mmreparam', 'official_resnet', 'official_repvgg',
            'mmpretrain_repvgg' or 'plain_resnet'.
        description (str): Human-readable, e.g. "official OREPA ResNet (train)".
        reparam (str, optional): The ``reparam`` of mmreparam that matches the checkpoint's
            blocks, None when it does not tell (plain or deploy checkpoints).
        bn_eps (float, optional): BatchNorm eps of the network that produced it; None for
            mmreparam's own checkpoints (the model's ``norm_cfg`` applies).
    """
    name: str
    description: str
    reparam: Optional[str] = None
    bn_eps: Optional[float] = SOURCE_BN_EPS


@dataclass
class ConversionReport:
    """The outcome of :func:`convert_checkpoint` / :func:`load_pretrained`.

    Attributes:
        format (CheckpointFormat): The detected layout.
        prefix (str, optional): The key prefix that was selected and stripped.
        num_model_tensors (int): Tensors in the model's state_dict (without the BNs'
            ``num_batches_tracked``, which are not counted anywhere).
        loaded (list[str]): Model keys given a value from the checkpoint.
        converted_blocks (list[str]): Blocks filled by folding or expansion (not copied).
        missing (list[str]): Model keys the checkpoint has no value for.
        unexpected (list[str]): Checkpoint keys (in mmreparam names) that were not used.
        mismatched (list[str]): One message per key or block whose shape does not fit.
        ignored (list[str]): Checkpoint keys dropped on purpose (classifier head, the
            official helper buffers).
    """
    format: CheckpointFormat
    prefix: Optional[str]
    num_model_tensors: int
    loaded: List[str] = field(default_factory=list)
    converted_blocks: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: format, how much was loaded, converted and left over."""
        prefix = f" under prefix '{self.prefix}'" if self.prefix else ''
        text = (f'{self.format.description}{prefix}: {len(self.loaded)}/'
                f'{self.num_model_tensors} model tensors loaded, '
                f'{len(self.converted_blocks)} block(s) folded or expanded')
        problems = [(len(self.missing), 'missing'), (len(self.unexpected), 'unused'),
                    (len(self.mismatched), 'mismatched'), (len(self.ignored), 'ignored')]
        extra = ', '.join(f'{count} {what}' for count, what in problems if count)
        return f'{text}; {extra}' if extra else text


# --------------------------------------------------------------------------------------
# Reading


def _read(checkpoint: Union[str, os.PathLike]) -> object:
    path = os.fspath(checkpoint)
    if '://' in path and not os.path.exists(path):
        # torchvision://, open-mmlab://, http(s):// ...: mmengine resolves and caches them
        # (its torch.load keeps torch's weights_only default).
        from mmengine.runner.checkpoint import CheckpointLoader
        try:
            return CheckpointLoader.load_checkpoint(path, map_location='cpu')
        except Exception as err:
            raise CheckpointError(f'cannot load checkpoint {path!r}: {err}') from err
    return safe_load(path)


def read_state_dict(checkpoint: Union[str, os.PathLike, Mapping],
                    prefix: Optional[str] = None) -> Tuple[StateDict, Optional[str]]:
    """Read the tensors of a checkpoint: unwrap, strip ``module.`` and the prefix.

    Args:
        checkpoint (str | PathLike | Mapping): A file, a URL mmengine can resolve, or an
            already loaded checkpoint / state_dict.
        prefix (str, optional): Keep only the keys under this prefix (e.g. ``'backbone.'``)
            and strip it. None strips ``backbone.`` when the checkpoint is a whole model.

    Returns:
        tuple[dict, str | None]: The state_dict and the prefix that was applied.

    Raises:
        CheckpointError: Unreadable file, no tensors, or no key under ``prefix``.
    """
    obj = checkpoint if isinstance(checkpoint, Mapping) else _read(checkpoint)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint holds a {type(obj).__name__}, not a state_dict')
    for wrapper in ('state_dict', 'model'):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    state = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            while key.startswith('module.'):  # (Distributed)DataParallel
                key = key[len('module.'):]
            state[key] = value
    if not state:
        raise CheckpointError('checkpoint holds no tensors (expected a state_dict, or a dict '
                              "with 'state_dict' or 'model')")
    if prefix is None and any(key.startswith('backbone.') for key in state):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        selected = {key[len(prefix):]: value for key, value in state.items()
                    if key.startswith(prefix)}
        if not selected:
            raise CheckpointError(f'no checkpoint key starts with prefix {prefix!r}; keys '
                                  f'look like {sorted(state)[:3]}')
        state = selected
    return state, prefix or None


# --------------------------------------------------------------------------------------
# Detection

_PLAIN_KEY = re.compile(r'^(conv1\.weight|layer\d+\.\d+\.conv\d\.weight|stem\.\d+\.weight)$')
_MMPRETRAIN_PARTS = {'branch_3x3', 'branch_1x1', 'branch_norm', 'branch_reparam'}
_OFFICIAL_DEPLOY = ('orepa_reparam', 'or1x1_reparam', 'or_large_reparam', 'dbb_reparam',
                    'rbr_reparam', 'fused_conv')


def _has(keys, *markers) -> bool:
    return any(marker in key for key in keys for marker in markers)


def _mode(train: bool, deploy: bool) -> str:
    return 'train and deploy' if train and deploy else 'deploy' if deploy else 'train'


#: Key fragments naming each ``reparam``'s blocks, train or deploy (first match wins).
_REPARAM_MARKERS = (
    (('rbr_dense.weight_orepa_', 'rbr_dense.weight_rbr_'), 'OREPA_VGG'),
    (('rbr_dense.conv.', ), 'RepVGG'),
    (('weight_orepa_', 'weight_or1x1_', 'orepa_reparam.', 'or1x1_reparam.',
      'or_large_reparam.'), 'OREPA'),
    (('dbb_origin.', 'dbb_reparam.'), 'DBB'),
    (('square_conv.', 'fused_conv.'), 'ACB'),
)


def _block_reparam(keys) -> Optional[str]:
    """mmreparam's ``reparam`` name of the blocks named in ``keys``, if they tell."""
    for markers, reparam in _REPARAM_MARKERS:
        if _has(keys, *markers):
            return reparam
    return None


def detect_format(state_dict: Mapping[str, Tensor]) -> CheckpointFormat:
    """Recognise the layout of a (prefix-stripped) state_dict.

    Args:
        state_dict (Mapping[str, Tensor]): The checkpoint's tensors.

    Returns:
        CheckpointFormat: The layout; 'mmreparam' when no other layout matches.
    """
    keys = list(state_dict)
    if any(key.startswith('stage0.') for key in keys):
        deploy = _has(keys, *_OFFICIAL_DEPLOY) or any(
            key.endswith('conv.bias') for key in keys)
        if any(key.startswith('stage0.conv1.') for key in keys):
            reparam = _block_reparam(keys) or 'base'
            train = _has(keys, '.bn.running_var')
            return CheckpointFormat(
                'official_resnet',
                f'official {reparam} ResNet/ResNeXt (OREPA_CVPR2022 / DiverseBranchBlock '
                f'layout, {_mode(train, deploy)})', reparam)
        orepa = _has(keys, 'weight_rbr_')
        train = _has(keys, 'rbr_dense.')
        name = 'OREPA-VGG' if orepa else 'RepVGG' if train else 'RepVGG / OREPA-VGG'
        return CheckpointFormat('official_repvgg',
                                f'official {name} ({_mode(train, deploy)})',
                                'OREPA_VGG' if orepa else 'RepVGG')
    if any(part in _MMPRETRAIN_PARTS for key in keys for part in key.split('.')):
        train = _has(keys, 'branch_3x3.')
        deploy = _has(keys, 'branch_reparam.')
        return CheckpointFormat('mmpretrain_repvgg',
                                f'mmpretrain RepVGG ({_mode(train, deploy)})', 'RepVGG')
    if any(_PLAIN_KEY.match(key) for key in keys):
        stem = ' with deep stem' if 'stem.0.weight' in state_dict else ''
        return CheckpointFormat('plain_resnet',
                                f'plain ResNet{stem} (torchvision / mmdet / mmpretrain layout)')
    train = _has(keys, '.bn.running_var', 'rbr_identity.', 'avgbn.')
    deploy = _has(keys, 'reparam_conv.')
    return CheckpointFormat('mmreparam', f'mmreparam ({_mode(train, deploy)})',
                            _block_reparam(keys) or ('base' if train and not deploy else None),
                            bn_eps=None)


# --------------------------------------------------------------------------------------
# Renaming to mmreparam's keys (one function per layout)

Renamed = Tuple[StateDict, List[str]]  # state_dict in mmreparam names, ignored keys

_OFFICIAL_UNIT = re.compile(r'^stage([1-9]\d*)\.(\d+)\.(conv\d|shortcut)\.(.+)$')
_OFFICIAL_VGG_UNIT = re.compile(r'^stage([1-9]\d*)\.(\d+)\.(.+)$')
_OFFICIAL_BUFFERS = {'id_tensor', 'weight_orepa_avg_avg', 'weight_orepa_prior',
                     'weight_rbr_avg_avg', 'weight_rbr_prior'}
_DEPLOY_NAME = re.compile(r'(^|\.)(' + '|'.join(_OFFICIAL_DEPLOY) + r')\.')
_PLAIN_UNIT = re.compile(r'^(layer\d+\.\d+)\.(conv|bn)(\d)\.(.+)$')
_PLAIN_DOWNSAMPLE = re.compile(r'^(layer\d+\.\d+)\.downsample\.(\d+)\.(.+)$')
# mmdet's deep stem (conv, norm, ReLU) x 3; mmpretrain's ``stem.N.conv`` / ``stem.N.bn``
# already has mmreparam's names.
_PLAIN_DEEP_STEM = re.compile(
    r'^stem\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$')


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


def _official_block_params(state: StateDict, ignored: List[str],
                           interleaved_pw: bool) -> Renamed:
    """Map the official block-level names and values to mmreparam's."""
    out = {}
    for key, value in state.items():
        if key.rsplit('.', 1)[-1] in _OFFICIAL_BUFFERS:
            ignored.append(key)
            continue
        key = _DEPLOY_NAME.sub(r'\1reparam_conv.', key)
        out[key.replace('weight_rbr_', 'weight_orepa_')] = value
    for key in [k for k in out if k == 'conv.bias' or k.endswith('.conv.bias')]:
        block = key[:-len('conv.bias')]  # an official deploy-form ConvBN
        if block + 'bn.running_var' not in out and block + 'conv.weight' in out:
            out[block + 'reparam_conv.weight'] = out.pop(block + 'conv.weight')
            out[block + 'reparam_conv.bias'] = out.pop(key)
    for key in [k for k in out if k.endswith('weight_orepa_1x1_kxk_conv1')]:
        # OREPA-VGG's plain 1x1 of the 1x1-kxk branch: ours is an offset from the identity.
        conv1 = out.pop(key)
        out[key[:-len('conv1')] + 'idconv1'] = conv1 - identity_kernel(
            conv1.shape[0], 1, in_channels=conv1.shape[1], dtype=conv1.dtype)
    for key in [k for k in out if k.endswith('rbr_dense.vector')]:
        out[key] = out[key][:5]  # OREPA-VGG's 6th row is never initialised nor used
    if interleaved_pw:
        for key in [k for k in out if k.endswith('weight_orepa_gconv_pw')]:
            dw = out.get(key[:-len('pw')] + 'dw')
            groups = dw.shape[0] // out[key].shape[1] if dw is not None else 1
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


_RENAMERS: Dict[str, Callable[[StateDict, nn.Module], Renamed]] = {
    'mmreparam': lambda state, model: (dict(state), []),
    'official_resnet': _rename_official_resnet,
    'official_repvgg': _rename_official_repvgg,
    'mmpretrain_repvgg': _rename_mmpretrain_repvgg,
    'plain_resnet': _rename_plain_resnet,
}

# --------------------------------------------------------------------------------------
# Block conversion: reduce a checkpoint block to kernel + affine map, expand into the model's

#: How to recognise the kind of a checkpoint block from its keys (first match wins).
_KIND_MARKERS = (
    ('reparam_conv.weight', 'deploy'),
    ('rbr_dense.weight_orepa_origin', OREPAVGGBlock),
    ('rbr_dense.conv.weight', RepVGGBlock),
    ('weight0.weight_orepa_origin', OREPALargeConv),
    ('weight_orepa_origin', OREPA),
    ('weight_or1x1_origin', OREPA1x1),
    ('dbb_origin.conv.weight', DBB),
    ('square_conv.weight', ACB),
    ('conv.weight', ConvBN),
)
#: Kinds whose linear part is "generated kernel -> one BN": their BN is kept as it is.
_SINGLE_BN_KINDS = (ConvBN, OREPA, OREPA1x1, OREPALargeConv)


class _BlockMismatch(Exception):
    """A checkpoint block does not fit the model's block; holds one message per problem."""

    def __init__(self, messages: List[str]):
        super().__init__('; '.join(messages))
        self.messages = messages


class _Affine(NamedTuple):
    """The eval-mode affine map after a kernel: a BN's statistics, or only a bias."""
    bias: Tensor
    weight: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    eps: float = 0.0

    @classmethod
    def of(cls, bn: _BatchNorm) -> '_Affine':
        ones = torch.ones_like(bn.running_mean)
        return cls(bn.bias if bn.affine else torch.zeros_like(ones),
                   bn.weight if bn.affine else ones, bn.running_mean, bn.running_var, bn.eps)


def _float64(tensor: Tensor) -> Tensor:
    tensor = tensor.detach().cpu()
    return tensor.to(torch.float64) if tensor.is_floating_point() else tensor.clone()


def _block_kind(block: ReparamBlock):
    return 'deploy' if block.reparam_conv is not None else type(block)


def _kind_name(kind) -> str:
    return kind if isinstance(kind, str) else kind.__name__


def _source_kind(keys) -> Optional[object]:
    for marker, kind in _KIND_MARKERS:
        if marker in keys:
            return kind
    return None


def _check_shapes(prefix: str, kind: str, state: Mapping[str, Tensor],
                  template: Mapping[str, Tensor]) -> None:
    """Raise :class:`_BlockMismatch` naming every missing, extra or mis-shaped key."""
    messages = []
    for key, value in state.items():
        if key not in template:
            messages.append(f'{prefix}{key}: not a key of a {kind} block here')
        elif value.shape != template[key].shape:
            messages.append(f'{prefix}{key}: checkpoint {tuple(value.shape)} vs model '
                            f'{tuple(template[key].shape)}')
    messages += [f'{prefix}{key}: missing in checkpoint' for key in template
                 if key not in state and not key.endswith('num_batches_tracked')]
    if messages:
        raise _BlockMismatch(messages)


def _linear_part(state: Mapping[str, Tensor]) -> StateDict:
    """A block's keys without its SE module (which is copied as it is)."""
    return {key: value for key, value in state.items() if not key.startswith('se.')}


def _source_kernel(block: ReparamBlock, kind, state: StateDict, name: str,
                   bn_eps: Optional[float]) -> Tuple[Tensor, _Affine]:
    """Build the checkpoint's block (model geometry), load it; return kernel and affine."""
    norm_cfg = block.norm_cfg if bn_eps is None else dict(type='BN', eps=bn_eps)
    block_type, deploy = (ConvBN, True) if kind == 'deploy' else (kind, False)
    try:
        source = block_type(block.in_channels, block.out_channels, block.kernel_size,
                            stride=block.stride, padding=block.padding,
                            dilation=block.dilation, groups=block.groups, norm_cfg=norm_cfg,
                            deploy=deploy)
    except (ValueError, TypeError) as err:
        raise _BlockMismatch([f'{name.rstrip(".") or "model"}: the checkpoint has a '
                              f'{block_type.__name__} here, which does not fit the model '
                              f'({err})']) from err
    source.double()  # fold in float64; OREPA's helper tensors follow the parameters' dtype
    _check_shapes(name, block_type.__name__, state, source.state_dict())
    source.load_state_dict(state, strict=False)
    if deploy:
        return source.reparam_conv.weight, _Affine(source.reparam_conv.bias)
    if isinstance(source, ConvBN):
        return source.conv.weight, _Affine.of(source.bn)
    if isinstance(source, _SINGLE_BN_KINDS):
        return source.generate_kernel(), _Affine.of(source.bn)
    kernel, bias = source.get_equivalent_kernel_bias()
    return kernel, _Affine(bias)


def _shift_var(var: Tensor, source_eps: float, eps: float) -> Tensor:
    """``running_var`` for a BN with ``eps`` that keeps ``running_var + eps`` unchanged."""
    if source_eps == eps:
        return var
    shifted = var + (source_eps - eps)
    if (shifted <= 0).any():
        raise CheckpointError(f'the model\'s BatchNorm eps {eps} is too large for the '
                              f'checkpoint\'s running_var (trained with eps {source_eps})')
    return shifted


def _bn_values(affine: _Affine, bn: _BatchNorm) -> Dict[str, Tensor]:
    """State of ``bn`` (with its own eps) computing the affine map in eval mode."""
    if not bn.affine:
        raise CheckpointError(f'cannot expand a checkpoint block into a model block with a '
                              f'non-affine {type(bn).__name__}')
    if affine.weight is None:  # a bias only: unit scale (gamma / std == 1 exactly)
        var = torch.ones_like(affine.bias)
        return dict(weight=(var + bn.eps).sqrt(), bias=affine.bias,
                    running_mean=torch.zeros_like(var), running_var=var)
    return dict(weight=affine.weight, bias=affine.bias, running_mean=affine.mean,
                running_var=_shift_var(affine.var, affine.eps, bn.eps))


def _set_bn(state: StateDict, prefix: str, bn: _BatchNorm, affine: _Affine) -> None:
    for key, value in _bn_values(affine, bn).items():
        state[prefix + key] = value.to(torch.float64)


def _zero_bn(state: StateDict, prefix: str) -> None:
    """A branch's last BN that outputs exactly zero (weight 0, bias 0)."""
    for key in ('weight', 'bias', 'running_mean'):
        if prefix + key in state:
            state[prefix + key] = torch.zeros_like(state[prefix + key])
    state[prefix + 'running_var'] = torch.ones_like(state[prefix + 'running_var'])


def _origin_vector(generator, out_channels: int) -> Tensor:
    vector = torch.zeros(len(generator.branch_names), out_channels, dtype=torch.float64)
    vector[generator.branch_names.index('origin')] = 1
    return vector


def _orthogonal(size: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _split_shift(shift: int, parts: int) -> List[int]:
    """Write ``shift`` as a sum of ``parts`` 3x3 tap offsets (each 0, 1 or 2)."""
    offsets = []
    for _ in range(parts):
        offsets.append(min(2, shift))
        shift -= offsets[-1]
    return offsets


def _large_conv_generators(block: OREPALargeConv, kernel: Tensor) -> StateDict:
    """Origins of the ``3x3`` generators of ``block`` whose composition is ``kernel``.

    The first ``L - 1`` generators are fixed: channel ``m`` of their composition is input
    channel ``c`` shifted to position ``p`` of the ``(k-2)x(k-2)`` grid, for ``p`` on a
    grid whose ``3x3`` windows cover ``kxk``; mixed by seeded orthogonal matrices so that no
    channel is zero. The last generator is the least-squares (float64) solution, which is
    exact since those shifted responses span every ``kxk`` kernel; checked.
    """
    k, num = block.kernel_size, block.num_generators
    cin, mid = block.in_channels, block.out_channels
    count = math.ceil(k / 3)
    positions = sorted({round(i * (k - 3) / (count - 1)) for i in range(count)})
    if cin * len(positions)**2 > mid:
        raise CheckpointError(
            f'cannot expand a {k}x{k} kernel on {cin} input channels into OREPALargeConv with '
            f'{mid} internal channels (needs at least {cin * len(positions)**2})')
    fixed = [torch.zeros(mid, cin if i == 0 else mid, 3, 3, dtype=torch.float64)
             for i in range(num - 1)]
    for m, (c, row, col) in enumerate(product(range(cin), positions, positions)):
        rows, cols = _split_shift(row, num - 1), _split_shift(col, num - 1)
        fixed[0][m, c, rows[0], cols[0]] = 1
        for i in range(1, num - 1):  # later generators enter the composition flipped
            fixed[i][m, m, 2 - rows[i], 2 - cols[i]] = 1
    mixing = [_orthogonal(mid, seed) for seed in range(num - 1)]
    fixed[0] = torch.einsum('pm,mihw->pihw', mixing[0], fixed[0])
    for i in range(1, num - 1):
        fixed[i] = torch.einsum('pm,mjhw,qj->pqhw', mixing[i], fixed[i], mixing[i - 1])
    partial = fixed[0]
    for generator in fixed[1:]:
        partial = compose_kernels(partial, generator.flip(-2, -1))
    # The composition is linear in the last generator: one column per entry of it.
    basis = torch.eye(mid * 9, dtype=torch.float64).reshape(mid * 9, mid, 3, 3)
    system = compose_kernels(partial, basis.flip(-2, -1)).reshape(mid * 9, -1).T
    target = kernel.reshape(kernel.shape[0], -1).T
    solution = torch.linalg.lstsq(system, target, driver='gelsd').solution
    residual = (system @ solution - target).abs().max() / target.abs().max().clamp_min(1e-300)
    if residual > _LARGE_CONV_TOLERANCE:
        raise CheckpointError(f'could not expand the {k}x{k} kernel into OREPALargeConv '
                              f'generators (relative residual {residual:.2e})')
    origins = fixed + [solution.T.reshape(block.out_channels, mid, 3, 3)]
    state = {}
    for i, origin in enumerate(origins):
        generator = getattr(block, f'weight{i}')
        state[f'weight{i}.weight_orepa_origin'] = origin
        state[f'weight{i}.vector'] = _origin_vector(generator, origin.shape[0])
    return state


def _set_orepa(state: StateDict, prefix: str, block: OREPA, kernel: Tensor) -> None:
    state[prefix + 'weight_orepa_origin'] = kernel
    state[prefix + 'vector'] = _origin_vector(block, block.out_channels)


def _expand(block: ReparamBlock, kernel: Tensor, affine: _Affine) -> StateDict:
    """State of ``block`` computing ``affine(conv(x, kernel))`` in eval mode.

    The kernel goes to the origin branch; every other branch is switched off (OREPA:
    ``vector`` rows 0; branch BNs: weight 0 and bias 0), its weights left as they are.
    """
    state = {key: _float64(value) for key, value in block.state_dict().items()}
    if block.reparam_conv is not None:
        if affine.weight is None:
            weight, bias = kernel, affine.bias
        else:
            scale = affine.weight / (affine.var + affine.eps).sqrt()
            weight = kernel * scale.reshape(-1, 1, 1, 1)
            bias = affine.bias - affine.mean * scale
        state.update({'reparam_conv.weight': weight, 'reparam_conv.bias': bias})
        return state
    if isinstance(block, RepVGGBlock):  # and OREPAVGGBlock
        if isinstance(block, OREPAVGGBlock):
            _set_orepa(state, 'rbr_dense.', block.rbr_dense, kernel)
        else:
            state['rbr_dense.conv.weight'] = kernel
        _set_bn(state, 'rbr_dense.bn.', block.rbr_dense.bn, affine)
        _zero_bn(state, 'rbr_1x1.bn.')
        if block.rbr_identity is not None:
            _zero_bn(state, 'rbr_identity.')
    elif isinstance(block, OREPALargeConv):
        state.update(_large_conv_generators(block, kernel))
        _set_bn(state, 'bn.', block.bn, affine)
        probe = copy.deepcopy(block).to('cpu', torch.float64)
        probe.load_state_dict(state)
        error = (probe.generate_kernel() - kernel).abs().max() / kernel.abs().max()
        if error > _LARGE_CONV_TOLERANCE:
            raise CheckpointError(f'OREPALargeConv expansion is off by {error:.2e} (relative)')
    elif isinstance(block, OREPA):
        _set_orepa(state, '', block, kernel)
        _set_bn(state, 'bn.', block.bn, affine)
    elif isinstance(block, OREPA1x1):
        state['weight_or1x1_origin'] = kernel
        state['vector'] = torch.tensor([[1.0], [0.0]], dtype=torch.float64).expand(
            2, block.out_channels).clone()
        _set_bn(state, 'bn.', block.bn, affine)
    elif isinstance(block, DBB):
        state['dbb_origin.conv.weight'] = kernel
        _set_bn(state, 'dbb_origin.bn.', block.dbb_origin.bn, affine)
        for prefix in ('dbb_1x1.bn.', 'dbb_avg.avgbn.', 'dbb_1x1_kxk.bn2.'):
            if prefix + 'running_var' in state:
                _zero_bn(state, prefix)
    elif isinstance(block, ACB):
        state['square_conv.weight'] = kernel
        _set_bn(state, 'square_bn.', block.square_bn, affine)
        _zero_bn(state, 'ver_bn.')
        _zero_bn(state, 'hor_bn.')
    elif isinstance(block, ConvBN):
        state['conv.weight'] = kernel
        _set_bn(state, 'bn.', block.bn, affine)
    else:
        raise CheckpointError(f'no expansion into {type(block).__name__} is known')
    return state


def _top_level_blocks(model: nn.Module) -> Dict[str, ReparamBlock]:
    """The re-parameterizable blocks of ``model`` that are not inside another one."""
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, ReparamBlock) and not any(
                name.startswith(outer + '.') or not outer for outer in blocks):
            blocks[name] = module
    return blocks


def _fit_running_var(model: nn.Module, key: str, value: Tensor,
                     bn_eps: Optional[float]) -> Tensor:
    """Keep ``running_var + eps`` when the model's BN has another eps than the source."""
    if bn_eps is None or not key.endswith('running_var'):
        return value
    module = model.get_submodule(key.rsplit('.', 1)[0]) if '.' in key else model
    if not isinstance(module, _BatchNorm):
        return value
    return _shift_var(value, bn_eps, module.eps)


def _group_by_block(source: StateDict, blocks: Mapping[str, ReparamBlock]
                     ) -> Dict[str, Dict[str, str]]:
    """``{block name: {key in block: checkpoint key}}``, SE modules left out."""
    grouped = defaultdict(dict)
    for key in source:
        for name in blocks:
            prefix = f'{name}.' if name else ''
            if key.startswith(prefix) and not key[len(prefix):].startswith('se.'):
                grouped[name][key[len(prefix):]] = key
                break
    return grouped


def _convert_block(model: nn.Module, name: str, block: ReparamBlock, kind,
                   block_state: StateDict, bn_eps: Optional[float]) -> Tuple[StateDict, bool]:
    """The block's new state (keys within the block) and whether it was folded/expanded."""
    prefix = f'{name}.' if name else ''
    if kind == _block_kind(block):
        _check_shapes(prefix, _kind_name(kind), block_state, _linear_part(block.state_dict()))
        return {key: _fit_running_var(model, prefix + key, value, bn_eps)
                for key, value in block_state.items()}, False
    kernel, affine = _source_kernel(block, kind, block_state, prefix, bn_eps)
    return _linear_part(_expand(block, kernel, affine)), True


def _to_model_layout(model: nn.Module, source: StateDict, report: ConversionReport,
                     bn_eps: Optional[float]) -> Tuple[StateDict, int]:
    """Convert a state_dict in mmreparam names to ``model``'s blocks; fill ``report``.

    Returns:
        tuple[dict, int]: The model's new state (keys it has values for) and how many
        checkpoint keys went into it.
    """
    template = model.state_dict()
    blocks = _top_level_blocks(model)
    state, seen, consumed = {}, set(), 0
    for name, keys in _group_by_block(source, blocks).items():
        kind = _source_kind(keys)
        if kind is None:
            continue
        seen.update(keys.values())
        block_state = {rest: source[key] for rest, key in keys.items()}
        try:
            converted, changed = _convert_block(model, name, blocks[name], kind, block_state,
                                                bn_eps)
        except _BlockMismatch as err:
            report.mismatched.extend(err.messages)
            continue
        if changed:
            report.converted_blocks.append(
                f'{name} ({_kind_name(kind)} -> {_kind_name(_block_kind(blocks[name]))})')
        prefix = f'{name}.' if name else ''
        state.update({prefix + key: value for key, value in converted.items()})
        consumed += len(keys)
    for key, value in source.items():
        if key in seen:
            continue
        if key not in template:
            report.unexpected.append(key)
        elif value.shape != template[key].shape:
            report.mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model '
                                     f'{tuple(template[key].shape)}')
        else:
            state[key] = _fit_running_var(model, key, value, bn_eps)
            consumed += 1
    counted = [key for key in template if not key.endswith('num_batches_tracked')]
    report.loaded = [key for key in counted if key in state]
    report.missing = [key for key in counted if key not in state]
    return state, consumed


def convert_checkpoint(model: nn.Module,
                       checkpoint: Union[str, os.PathLike, Mapping],
                       prefix: Optional[str] = None) -> Tuple[StateDict, ConversionReport]:
    """Convert a checkpoint to the state_dict layout of ``model`` (which is not changed).

    Args:
        model (nn.Module): An mmreparam backbone (or any model made of mmreparam blocks).
            Its current values fill the switched-off branches of expanded blocks.
        checkpoint (str | PathLike | Mapping): File, URL or loaded checkpoint.
        prefix (str, optional): See :func:`read_state_dict`.

    Returns:
        tuple[dict, ConversionReport]: The converted state_dict (model key names; float64
        where converted) and the report.

    Raises:
        CheckpointError: Unreadable or unrecognised checkpoint, or too little of it fits
            the model (wrong architecture); the message names the first mismatches.
    """
    source, prefix = read_state_dict(checkpoint, prefix)
    fmt = detect_format(source)
    renamed, ignored = _RENAMERS[fmt.name](source, model)
    num_tensors = sum(not key.endswith('num_batches_tracked') for key in model.state_dict())
    report = ConversionReport(fmt, prefix, num_tensors, ignored=ignored)
    with torch.no_grad():
        state, consumed = _to_model_layout(model, renamed, report, fmt.bn_eps)
    too_little = (len(report.loaded) < MIN_MATCHED_FRACTION * report.num_model_tensors
                  or consumed < MIN_MATCHED_FRACTION * len(renamed))
    if too_little:
        _log_problems(report)
        first = report.mismatched[:3] or report.unexpected[:3] or report.missing[:3]
        raise CheckpointError(
            f'checkpoint does not fit {type(model).__name__} ({report.summary()}); wrong '
            f'architecture? First problems: {"; ".join(first)}')
    return state, report


def _log_problems(report: ConversionReport) -> None:
    for title, keys in (('shape mismatch', report.mismatched),
                        ('not used from checkpoint', report.unexpected),
                        ('missing in checkpoint', report.missing)):
        for key in keys:
            print_log(f'load_pretrained: {title}: {key}', logger='current',
                      level=logging.WARNING)


def load_pretrained(model: nn.Module,
                    checkpoint: Union[str, os.PathLike, Mapping],
                    prefix: Optional[str] = None) -> ConversionReport:
    """Load a checkpoint of any supported layout into an mmreparam model.

    Logs one line naming the detected format, then one warning per key that was not
    loaded, not used or did not fit.

    Args:
        model (nn.Module): The model to load into (changed in place).
        checkpoint (str | PathLike | Mapping): File, URL or loaded checkpoint; a
            ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper and ``module.`` prefixes
            are accepted.
        prefix (str, optional): Keep only the keys under this prefix (``'backbone.'`` of a
            whole detector or classifier) and strip it. None strips ``backbone.`` when
            present.

    Returns:
        ConversionReport: What was loaded, converted and left over.

    Raises:
        CheckpointError: Unreadable checkpoint, or too little of it fits the model.
    """
    state, report = convert_checkpoint(model, checkpoint, prefix)
    model.load_state_dict(state, strict=False)
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'state_dict'
    print_log(f'load_pretrained {os.fspath(source)!r}: {report.summary()}', logger='current')
    _log_problems(report)
    return report


__all__ = ['CheckpointFormat', 'ConversionReport', 'convert_checkpoint', 'detect_format',
           'load_pretrained', 'read_state_dict']
