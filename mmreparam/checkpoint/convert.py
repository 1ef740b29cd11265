"""Load ImageNet checkpoints of other layouts into mmreparam backbones.

:func:`load_pretrained` reads a checkpoint (:mod:`.reading`), recognises its layout
(:mod:`.formats`), renames its keys to mmreparam's (:mod:`.layouts`) and converts block by
block for the model at hand:

- mmreparam's own checkpoints (train or deploy form, any ``reparam``);
- the official OREPA / DBB ResNets and ResNeXts (JUGGHM/OREPA_CVPR2022,
  DingXiaoH/DiverseBranchBlock; ``stage0.conv1`` ... ``linear``), train or deploy;
- the official RepVGG (DingXiaoH/RepVGG) and OREPA-VGG, train or deploy;
- the official RepMLP-ResNets (DingXiaoH/RepMLP ``repmlp_resnet.py``, light and
  bottleneck), train or deploy, into the same form;
- mmpretrain's RepVGG (``branch_3x3`` / ``branch_1x1`` / ``branch_norm`` /
  ``branch_reparam``), usually a whole classifier under ``backbone.``;
- plain ResNets in torchvision / mmdet / mmpretrain layout (``conv1``, ``bn1``,
  ``layerX.Y.convK`` / ``bnK``, ``downsample``; mmdet's deep stem ``stem.0`` ... ``stem.7``);
- timm's RepVGG (``repvgg_*``: ``stem``, ``stages.N.M`` with ``conv_kxk`` / ``conv_1x1`` /
  ``identity``, or ``reparam_conv`` once reparameterized) and ResNet-D (``resnet*d``: the
  deep stem ``conv1.0`` ... ``conv1.6`` + ``bn1``, torchvision's stages).

Each block of the model is then filled in one of three ways. A checkpoint block of the same
type is copied. A block of another type is built in the model's geometry, loaded, and
reduced to one kernel and an affine map (its
:meth:`~mmreparam.models.layers.ReparamBlock.kernel_and_affine`), which the model's block
expands into its own state (its
:meth:`~mmreparam.models.layers.ReparamBlock.expansion_state`) so that it computes the
same function in eval mode. The converter knows no block: it is written over that protocol.
The fold and expansion math runs in float64.

Whatever does not match is logged key by key; a checkpoint that matches too little of the
model (wrong architecture) raises :class:`CheckpointError`.
"""
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError, ExpansionError
from ..models.layers import ConvBN, ReparamBlock
from ..models.layers.base import block_type_of_state
from ..models.layers.fuse import shift_running_var
from .formats import CheckpointFormat, detect_format
from .layouts import RENAMERS
from .reading import StateDict, read_state_dict

#: A load fails when less than this fraction of the model's tensors, or of the
#: checkpoint's backbone tensors, is used.
MIN_MATCHED_FRACTION = 0.5


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
# Block conversion: reduce a checkpoint block to kernel + affine map, expand into the model's

#: The checkpoint block is a folded one (a conv with bias).
DEPLOY = 'deploy'


class _BlockMismatch(Exception):
    """A checkpoint block does not fit the model's block; holds one message per problem."""

    def __init__(self, messages: List[str]):
        super().__init__('; '.join(messages))
        self.messages = messages


def _block_kind(block: ReparamBlock):
    return DEPLOY if block.folded else type(block)


def _kind_name(kind) -> str:
    return kind if isinstance(kind, str) else kind.__name__


def _source_kind(keys) -> Optional[object]:
    """The kind of a checkpoint block from its keys: DEPLOY, a block type, or None."""
    if 'reparam_conv.weight' in keys:
        return DEPLOY
    return block_type_of_state(keys)


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


def _source_block(block: ReparamBlock, kind, state: StateDict, name: str,
                  bn_eps: Optional[float]) -> ReparamBlock:
    """The checkpoint's block, built in the model block's geometry (float64) and loaded."""
    norm_cfg = block.norm_cfg if bn_eps is None else dict(type='BN', eps=bn_eps)
    block_type, deploy = (ConvBN, True) if kind == DEPLOY else (kind, False)
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
    return source


def _convert_block(model: nn.Module, name: str, block: ReparamBlock, kind,
                   block_state: StateDict, bn_eps: Optional[float]) -> Tuple[StateDict, bool]:
    """The block's new state (keys within the block) and whether it was folded/expanded."""
    prefix = f'{name}.' if name else ''
    if kind == _block_kind(block):
        _check_shapes(prefix, _kind_name(kind), block_state, _linear_part(block.state_dict()))
        return {key: _fit_running_var(model, prefix + key, value, bn_eps)
                for key, value in block_state.items()}, False
    source = _source_block(block, kind, block_state, prefix, bn_eps)
    kernel, affine = source.kernel_and_affine()
    try:
        state = block.expansion_state(kernel, affine)
    except ExpansionError as err:
        raise CheckpointError(f'{name or "model"}: {err}') from err
    return _linear_part(state), True


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
    try:
        return shift_running_var(value, bn_eps, module.eps)
    except ExpansionError as err:
        raise CheckpointError(f'{key}: {err}') from err


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
    if fmt.name not in RENAMERS:
        raise CheckpointError(f'checkpoint of {fmt.description}: no conversion to '
                              f'{type(model).__name__} is known')
    renamed, ignored = RENAMERS[fmt.name](source, model)
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
