"""Expand a plain (or folded, or other re-param) model into a chosen re-param form."""
import os
from typing import Mapping, Optional, Union

import torch.nn as nn
from mmengine.logging import print_log

from ..checkpoint import CheckpointError, ConversionReport, convert_checkpoint
from ..checkpoint.reading import describe_checkpoint

Source = Union[nn.Module, Mapping, str, os.PathLike]


def expand(model: nn.Module, source: Source, prefix: Optional[str] = None,
           strict: bool = True, allow_nonfinite: bool = False) -> ConversionReport:
    """Make ``model`` compute what ``source`` computes: the counterpart of :func:`fold`.

    ``model`` is an mmreparam model in the form to train (e.g.
    ``mmreparam.ResNet(depth=50, reparam='OREPA')``); ``source`` is a network of the same
    architecture in any form mmreparam reads: a plain conv+BN model (torchvision, mmdet or
    mmpretrain ResNet), a folded or train-time mmreparam model of any ``reparam``, or a
    checkpoint of one (any layout :func:`~mmreparam.checkpoint.load_pretrained` reads).
    Every block of ``model`` is given the state with which it computes its counterpart's
    function in eval mode (the origin branch carries the kernel, the other branches are
    switched off; see :meth:`~mmreparam.models.layers.ReparamBlock.expansion_state`), so
    that training starts from the source network's function with all branches trainable.

    Args:
        model (nn.Module): The model to fill (changed in place).
        source (nn.Module | Mapping | str | PathLike): The network, its state_dict, or a
            checkpoint file.
        prefix (str, optional): See :func:`~mmreparam.checkpoint.read_state_dict`.
        strict (bool): Raise when a tensor of ``model`` gets no value or a tensor of
            ``source`` is not used, mismatched or dropped (then the function is not carried
            over exactly; classifier heads such as torchvision's ``fc`` are dropped on
            purpose and do not count, and are named in the log). Defaults to True.
        allow_nonfinite (bool): Accept NaN / Inf values in ``source``. Defaults to False.

    Returns:
        ConversionReport: What was copied, folded or expanded.

    Raises:
        CheckpointError: The source does not fit ``model`` (or, with ``strict``, not
            every tensor found its place); ``model`` is then left unchanged.
    """
    source_state = source.state_dict() if isinstance(source, nn.Module) else source
    state, report = convert_checkpoint(model, source_state, prefix, allow_nonfinite)
    if strict:
        problems = ([f'missing: {key}' for key in report.missing]
                    + [f'not used: {key}' for key in report.unexpected]
                    + [f'mismatched: {key}' for key in report.mismatched])
        if problems:
            where = ('source model' if isinstance(source, nn.Module) else
                     describe_checkpoint(source))
            raise CheckpointError(f'expand of {where} into {type(model).__name__} is not '
                                  f'exact ({report.summary()}): {"; ".join(problems[:5])}')
    model.load_state_dict(state, strict=False)
    print_log(f'mmreparam.expand into {type(model).__name__}: {report.summary()}',
              logger='current')
    return report


__all__ = ['expand']
