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

Whatever does not match is summarized in the log (counts and the first keys at WARNING,
every key at DEBUG); a checkpoint that matches too little of the model (wrong architecture)
raises :class:`CheckpointError`, which says so when every mismatch is one width ratio. A
checkpoint with NaN or Inf values is refused unless ``allow_nonfinite=True``, and a
conversion never hands on a non-finite value it made itself. Every failure is one
:class:`CheckpointError` naming the checkpoint, the block or keys, and what was expected.
"""
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError, ExpansionError
from ..models.layers import ConvBN, ReparamBlock
from ..models.layers.base import block_type_of_state, block_types
from ..models.layers.fuse import shift_running_var
from .formats import CheckpointFormat, detect_format
from .layouts import RENAMERS
from .reading import StateDict, check_finite, describe_checkpoint, nonfinite_keys, read_state_dict

#: A load fails when less than this fraction of the model's tensors, or of the
#: checkpoint's backbone tensors, is used.
MIN_MATCHED_FRACTION = 0.5
#: How many keys per kind of problem a WARNING names (all of them go to DEBUG).
NAMED_KEYS = 3


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
        mismatched_shapes (list[tuple]): ``(checkpoint shape, model shape)`` of each
            mismatched tensor (what :meth:`width_ratio` reads).
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
    mismatched_shapes: List[Tuple[tuple, tuple]] = field(default_factory=list, repr=False)

    @property
    def partial(self) -> bool:
        """Whether something was missing, unused or mismatched (the model then holds a mix
        of loaded and initial values, or the checkpoint was not used whole)."""
        return bool(self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: format, how much was loaded, converted and left over (the keys dropped
        on purpose are named)."""
        prefix = f" under prefix '{self.prefix}'" if self.prefix else ''
        text = (f'{self.format.description}{prefix}: {len(self.loaded)}/'
                f'{self.num_model_tensors} model tensors loaded, '
                f'{len(self.converted_blocks)} block(s) folded or expanded')
        problems = [(len(self.missing), 'missing'), (len(self.unexpected), 'unused'),
                    (len(self.mismatched), 'mismatched')]
        extra = [f'{count} {what}' for count, what in problems if count]
        if self.ignored:
            extra.append(f'{len(self.ignored)} ignored ({_first_keys(self.ignored)})')
        return f'{text}; {", ".join(extra)}' if extra else text

    def width_ratio(self) -> Optional[Fraction]:
        """The one ratio ``r != 1`` such that every mismatched shape is the model's with
        some dimensions scaled by ``r`` (a checkpoint of a narrower or wider network), or
        None."""
        ratios = set()
        for have, want in self.mismatched_shapes:
            if len(have) != len(want) or 0 in want:
                return None
            scaled = {Fraction(a, b) for a, b in zip(have, want) if a != b}
            if not scaled:
                return None
            ratios |= scaled
        return ratios.pop() if len(ratios) == 1 else None


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


def _first_keys(keys: List[str]) -> str:
    more = f', ... ({len(keys) - NAMED_KEYS} more)' if len(keys) > NAMED_KEYS else ''
    return ', '.join(keys[:NAMED_KEYS]) + more


def _source_kind(name: str, keys) -> Optional[object]:
    """The kind of a checkpoint block from its keys: DEPLOY, a block type, or None.

    Raises:
        CheckpointError: The keys carry the markers of two equally specific block types
            (naming the block and those keys).
    """
    if 'reparam_conv.weight' in keys:
        return DEPLOY
    try:
        return block_type_of_state(keys)
    except ValueError as err:
        prefix = f'{name}.' if name else ''
        found = [cls for cls in block_types() if set(cls.state_markers) <= set(keys)]
        best = max(len(cls.state_markers) for cls in found)
        clash = '; '.join(f'{cls.__name__} ({", ".join(prefix + m for m in cls.state_markers)})'
                          for cls in found if len(cls.state_markers) == best)
        raise CheckpointError(
            f'block {name or "model"!r} of the checkpoint holds the keys of several block '
            f'types: {clash}; expected the keys of one') from err


def _check_shapes(prefix: str, kind: str, state: Mapping[str, Tensor],
                  template: Mapping[str, Tensor],
                  shapes: Optional[List[Tuple[tuple, tuple]]] = None) -> List[str]:
    """Raise :class:`_BlockMismatch` naming every missing, mis-shaped or non-float key.

    Returns:
        list[str]: The keys of ``state`` the block does not have (unused, not an error).
    """
    messages, extra = [], []
    for key, value in state.items():
        if key not in template:
            extra.append(key)
        elif value.shape != template[key].shape:
            messages.append(f'{prefix}{key}: checkpoint {tuple(value.shape)} vs model '
                            f'{tuple(template[key].shape)}')
            if shapes is not None:
                shapes.append((tuple(value.shape), tuple(template[key].shape)))
        elif template[key].is_floating_point() and not value.is_floating_point():
            messages.append(f'{prefix}{key}: checkpoint holds {value.dtype}, expected a '
                            'floating-point tensor')
    messages += [f'{prefix}{key}: missing in checkpoint (a {kind} block here)'
                 for key in template
                 if key not in state and not key.endswith('num_batches_tracked')]
    if messages:
        raise _BlockMismatch(messages)
    return extra


def _linear_part(state: Mapping[str, Tensor]) -> StateDict:
    """A block's keys without its SE module (which is copied as it is)."""
    return {key: value for key, value in state.items() if not key.startswith('se.')}


def _source_block(block: ReparamBlock, kind, state: StateDict, name: str,
                  bn_eps: Optional[float], report: ConversionReport) -> ReparamBlock:
    """The checkpoint's block, built in the model block's geometry (float64) and loaded;
    keys the block type does not have are left out (and reported unused)."""
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
    extra = _check_shapes(name, block_type.__name__, state, source.state_dict(),
                          report.mismatched_shapes)
    report.unexpected.extend(name + key for key in extra)
    source.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=False)
    return source


def _convert_block(model: nn.Module, name: str, block: ReparamBlock, kind,
                   block_state: StateDict, bn_eps: Optional[float],
                   report: ConversionReport) -> Tuple[StateDict, bool]:
    """The block's new state (keys within the block) and whether it was folded/expanded.

    Keys of the checkpoint block that its type does not have go to ``report.unexpected``
    (the block is converted from the others, not skipped)."""
    prefix = f'{name}.' if name else ''
    if kind == _block_kind(block):
        extra = _check_shapes(prefix, _kind_name(kind), block_state,
                              _linear_part(block.state_dict()), report.mismatched_shapes)
        report.unexpected.extend(prefix + key for key in extra)
        return {key: _fit_running_var(model, prefix + key, value, bn_eps)
                for key, value in block_state.items() if key not in extra}, False
    source = _source_block(block, kind, block_state, prefix, bn_eps, report)
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
                     bn_eps: Optional[float], where: str) -> Tuple[StateDict, int]:
    """Convert a state_dict in mmreparam names to ``model``'s blocks; fill ``report``.

    Returns:
        tuple[dict, int]: The model's new state (keys it has values for) and how many
        checkpoint keys went into it.
    """
    template = model.state_dict()
    blocks = _top_level_blocks(model)
    state, seen, consumed = {}, set(), 0
    for name, keys in _group_by_block(source, blocks).items():
        try:
            kind = _source_kind(name, keys)
        except CheckpointError as err:
            raise CheckpointError(f'{where}: {err}') from err
        if kind is None:
            continue
        seen.update(keys.values())
        block_state = {rest: source[key] for rest, key in keys.items()}
        unused_before = len(report.unexpected)
        try:
            converted, changed = _convert_block(model, name, blocks[name], kind, block_state,
                                                bn_eps, report)
        except _BlockMismatch as err:
            report.mismatched.extend(err.messages)
            continue
        except CheckpointError as err:
            raise CheckpointError(f'{where}: {err}') from err
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise CheckpointError(
                f'{where}: block {name or "model"!r} ({_kind_name(kind)} in the checkpoint) '
                f'cannot be converted: {type(err).__name__}: {str(err).splitlines()[0]}'
            ) from err
        if changed:
            report.converted_blocks.append(
                f'{name} ({_kind_name(kind)} -> {_kind_name(_block_kind(blocks[name]))})')
        prefix = f'{name}.' if name else ''
        state.update({prefix + key: value for key, value in converted.items()})
        consumed += len(keys) - (len(report.unexpected) - unused_before)
    for key, value in source.items():
        if key in seen:
            continue
        if key not in template:
            report.unexpected.append(key)
        elif value.shape != template[key].shape:
            report.mismatched.append(f'{key}: checkpoint {tuple(value.shape)} vs model '
                                     f'{tuple(template[key].shape)}')
            report.mismatched_shapes.append((tuple(value.shape), tuple(template[key].shape)))
        elif template[key].is_floating_point() and not value.is_floating_point():
            report.mismatched.append(f'{key}: checkpoint holds {value.dtype}, expected a '
                                     'floating-point tensor')
        else:
            try:
                state[key] = _fit_running_var(model, key, value, bn_eps)
            except CheckpointError as err:
                raise CheckpointError(f'{where}: {err}') from err
            consumed += 1
    counted = [key for key in template if not key.endswith('num_batches_tracked')]
    report.loaded = [key for key in counted if key in state]
    report.missing = [key for key in counted if key not in state]
    return state, consumed


def convert_checkpoint(model: nn.Module,
                       checkpoint: Union[str, os.PathLike, Mapping],
                       prefix: Optional[str] = None,
                       allow_nonfinite: bool = False) -> Tuple[StateDict, ConversionReport]:
    """Convert a checkpoint to the state_dict layout of ``model`` (which is not changed).

    Args:
        model (nn.Module): An mmreparam backbone (or any model made of mmreparam blocks).
            Its current values fill the switched-off branches of expanded blocks.
        checkpoint (str | PathLike | Mapping): File, URL or loaded checkpoint.
        prefix (str, optional): See :func:`read_state_dict`.
        allow_nonfinite (bool): Accept NaN / Inf values in the checkpoint (and in what the
            conversion makes of them). Defaults to False: refused, naming the first keys.

    Returns:
        tuple[dict, ConversionReport]: The converted state_dict (model key names; float64
        where converted) and the report.

    Raises:
        CheckpointError: Unreadable, unsafe, corrupted, non-finite or unrecognised
            checkpoint; a block that cannot be converted; or too little of it fits the model
            (wrong architecture). The message names the checkpoint and the first problems.
    """
    where = describe_checkpoint(checkpoint)
    source, prefix = read_state_dict(checkpoint, prefix)
    if not allow_nonfinite:
        check_finite(source, where)
    fmt = detect_format(source)
    if fmt.name not in RENAMERS:
        raise CheckpointError(f'{where} of {fmt.description}: no conversion to '
                              f'{type(model).__name__} is known')
    try:
        renamed, ignored = RENAMERS[fmt.name](source, model)
    except CheckpointError as err:
        raise CheckpointError(f'{where}: {err}') from err
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise CheckpointError(f'{where}: its {fmt.description} keys cannot be renamed: '
                              f'{type(err).__name__}: {str(err).splitlines()[0]}') from err
    num_tensors = sum(not key.endswith('num_batches_tracked') for key in model.state_dict())
    report = ConversionReport(fmt, prefix, num_tensors, ignored=ignored)
    with torch.no_grad():
        state, consumed = _to_model_layout(model, renamed, report, fmt.bn_eps, where)
    too_little = (len(report.loaded) < MIN_MATCHED_FRACTION * report.num_model_tensors
                  or consumed < MIN_MATCHED_FRACTION * len(renamed))
    if too_little:
        _log_problems(report)
        first = report.mismatched[:3] or report.unexpected[:3] or report.missing[:3]
        raise CheckpointError(
            f'{where} does not fit {type(model).__name__} ({report.summary()}); '
            f'{_wrong_model_hint(model, report)} First problems: {"; ".join(first)}')
    made = nonfinite_keys(state)
    if made and not allow_nonfinite:
        raise CheckpointError(
            f'{where}: converting it gave NaN or Inf in {_first_keys(made)} (e.g. a BN '
            'running_var below -eps in the checkpoint); refused')
    return state, report


def _wrong_model_hint(model: nn.Module, report: ConversionReport) -> str:
    """"wrong architecture?", or what a single width ratio of every mismatch says."""
    ratio = report.width_ratio()
    if ratio is None:
        return 'wrong architecture?'
    hint = f'every mismatched shape is {float(ratio):g}x the model\'s: the checkpoint is of ' \
        f'a network {float(ratio):g}x as wide'
    channels = getattr(model, 'base_channels', None)
    if isinstance(channels, int) and (channels * ratio).denominator == 1:
        hint += f' (build the model with base_channels={int(channels * ratio)}; ' \
            f'tools/convert.py: --set base_channels={int(channels * ratio)})'
    else:
        hint += ' (build the model with the checkpoint\'s width)'
    return hint + '.'


def _log_problems(report: ConversionReport) -> None:
    """One WARNING per kind of problem (count and first keys), every key at DEBUG."""
    for title, keys in (('shape mismatch', report.mismatched),
                        ('not used from checkpoint', report.unexpected),
                        ('missing in checkpoint', report.missing)):
        if not keys:
            continue
        print_log(f'load_pretrained: {title}: {len(keys)} key(s): {_first_keys(keys)}',
                  logger='current', level=logging.WARNING)
        for key in keys:
            print_log(f'load_pretrained: {title}: {key}', logger='current',
                      level=logging.DEBUG)


def load_pretrained(model: nn.Module,
                    checkpoint: Union[str, os.PathLike, Mapping],
                    prefix: Optional[str] = None,
                    allow_nonfinite: bool = False) -> ConversionReport:
    """Load a checkpoint of any supported layout into an mmreparam model.

    Logs one line naming the detected format, then one warning per kind of problem (keys
    not loaded, not used or that did not fit: how many, and the first ones; all of them at
    DEBUG level).

    Args:
        model (nn.Module): The model to load into (changed in place).
        checkpoint (str | PathLike | Mapping): File, URL or loaded checkpoint; a
            ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper and ``module.`` prefixes
            are accepted.
        prefix (str, optional): Keep only the keys under this prefix (``'backbone.'`` of a
            whole detector or classifier) and strip it. None strips ``backbone.`` when
            present.
        allow_nonfinite (bool): Load NaN / Inf values. Defaults to False (refused).

    Returns:
        ConversionReport: What was loaded, converted and left over.

    Raises:
        CheckpointError: Unreadable, unsafe, corrupted or non-finite checkpoint, or too
            little of it fits the model.
    """
    state, report = convert_checkpoint(model, checkpoint, prefix, allow_nonfinite)
    model.load_state_dict(state, strict=False)
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else 'state_dict'
    print_log(f'load_pretrained {os.fspath(source)!r}: {report.summary()}', logger='current')
    _log_problems(report)
    return report


__all__ = ['CheckpointFormat', 'ConversionReport', 'convert_checkpoint', 'detect_format',
           'load_pretrained', 'read_state_dict']
