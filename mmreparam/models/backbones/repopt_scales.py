"""RepOptimizer scales as data: their form, the constant ones, and whether they fit a model.

Scales are a dict ``{block name: {'conv': s, 'conv_1x1': t[, 'identity': w_id]}}`` of
``(C_out, )`` tensors, block names as in :meth:`mmreparam.RepOptVGG.repopt_blocks`
(``'stem'``, ``'stage_1.0'``, ...). A *scales source* is ``'const'`` (:func:`constant_scales`),
a scales dict, a scales file or a hyper-search checkpoint (a file or a loaded one).

The models layer does not read files or checkpoints: :data:`SCALES_LOADERS` holds the loader
of the layer that does (:func:`mmreparam.engine.optimizers.load_scales`, put there when
mmreparam is imported), and :func:`resolve_scales` reads every source but ``'const'``
through it.
"""
import math
import os
from typing import Callable, Dict, Mapping, Union

import torch
from torch import Tensor

from ...errors import ScalesError
from ..layers.csla import SCALE_KEYS, has_identity_branch

Scales = Dict[str, Dict[str, Tensor]]
ScalesSource = Union[str, os.PathLike, Mapping]

#: ``'load_scales'``: ``(source) -> Scales`` for every scales source but ``'const'`` (a plain
#: dict: the engine layer, which reads files, puts its loader here; the models layer below it
#: cannot import it).
SCALES_LOADERS: Dict[str, Callable[[ScalesSource], Scales]] = {}


def describe_source(source) -> str:
    """A scales source in words, for messages (``"scales file 'b1.pth'"``)."""
    if isinstance(source, (str, os.PathLike)):
        return 'constant scales' if source == 'const' else f'scales file {os.fspath(source)!r}'
    return 'scales dict'


def validate_scales(scales: Mapping, source: str) -> Scales:
    """Check the form of a scales dict; return it as float32 CPU tensors.

    Args:
        scales (Mapping): Block name -> ``{'conv', 'conv_1x1'[, 'identity']: tensor}``.
        source (str): What the scales came from, for the messages.

    Returns:
        dict: The scales, detached float32 copies on the CPU.

    Raises:
        ScalesError: Not a dict of that form, non-finite values, or empty.
    """
    out = {}
    for name, entry in scales.items():
        if not isinstance(name, str) or not isinstance(entry, Mapping):
            raise ScalesError(f'{source}: entry {name!r} is not a block name mapped to a '
                              f'dict of scales')
        unknown = set(entry) - set(SCALE_KEYS)
        missing = {'conv', 'conv_1x1'} - set(entry)
        if unknown or missing:
            raise ScalesError(f'{source}: block {name!r} has keys {sorted(entry)}; expected '
                              f"'conv', 'conv_1x1' and optionally 'identity'")
        values = {}
        for key, value in entry.items():
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 1:
                raise ScalesError(f'{source}: {name}.{key} is not a 1-d float tensor')
            if not torch.isfinite(value).all():
                raise ScalesError(f'{source}: {name}.{key} has non-finite values')
            values[key] = value.detach().float().cpu()
        if len({v.numel() for v in values.values()}) != 1:
            raise ScalesError(f'{source}: the scales of block {name!r} differ in length')
        out[name] = values
    if not out:
        raise ScalesError(f'{source}: no scales')
    return out


def constant_scales(backbone) -> Scales:
    """The HS model's initial scales (the paper's "same as HS initialization").

    The stem and the first block of each stage get 1, the ``l``-th later block of a stage
    ``sqrt(2 / l)`` (the official ``conv_scale_init``), for ``s`` and ``t``; the identity
    factor 1. Float32 on the CPU (also for a model on the ``meta`` device).

    Args:
        backbone (RepOptVGG): Any form; only its block layout is read.

    Returns:
        dict: The scales of every block of ``backbone``.
    """
    scales = {}
    for name, block in backbone.repopt_blocks().items():
        index = 0 if name == 'stem' else int(name.rsplit('.', 1)[1])
        value = 1.0 if index == 0 else math.sqrt(2.0 / index)
        channels = block.out_channels
        entry = dict(conv=torch.full((channels, ), value, device='cpu'),
                     conv_1x1=torch.full((channels, ), value, device='cpu'))
        if has_identity_branch(block):
            entry['identity'] = torch.ones(channels, device='cpu')
        scales[name] = entry
    return scales


def check_scales(scales: Scales, backbone, source: str = 'scales') -> None:
    """Raise :class:`ScalesError` naming every block of ``backbone`` the scales do not fit.

    Args:
        scales (dict): Validated scales.
        backbone (RepOptVGG): The model they are for (any form).
        source (str): What the scales came from, for the message. Defaults to 'scales'.
    """
    expected = {name: (block.out_channels, has_identity_branch(block))
                for name, block in backbone.repopt_blocks().items()}
    problems = [f'no scales for block {name}' for name in expected if name not in scales]
    problems += [f'scales for block {name}, which the model does not have'
                 for name in scales if name not in expected]
    for name, (channels, has_identity) in expected.items():
        entry = scales.get(name)
        if entry is None:
            continue
        for key in SCALE_KEYS:
            value = entry.get(key)
            if value is None:
                if key != 'identity' or has_identity:
                    problems.append(f'{name}: no {key!r} scale')
            elif key == 'identity' and not has_identity:
                problems.append(f"{name}: an 'identity' scale, but the block has no "
                                'identity branch')
            elif value.numel() != channels:
                problems.append(f'{name}: {key!r} has {value.numel()} channels, the '
                                f'block has {channels}')
    if problems:
        more = f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''
        raise ScalesError(
            f'{source}: the scales do not fit RepOptVGG arch {backbone.arch_name!r} '
            f'({len(scales)} blocks given, the model has {len(expected)}): '
            f'{"; ".join(problems[:4])}{more}')


def resolve_scales(source, backbone) -> Scales:
    """The scales a source names for ``backbone``, checked against it.

    Args:
        source (str | PathLike | Mapping | None): A scales source; None means ``'const'``.
        backbone (RepOptVGG): The model (any form).

    Returns:
        dict: Validated scales that fit ``backbone``.

    Raises:
        FileNotFoundError: A scales file that does not exist.
        ScalesError: Unreadable, malformed, or not fitting ``backbone``.
    """
    if source is None or (isinstance(source, str) and source == 'const'):
        return constant_scales(backbone)
    load = SCALES_LOADERS.get('load_scales')
    if load is None:
        raise ScalesError(f'cannot read {describe_source(source)}: no scales loader is '
                          'registered (mmreparam.engine registers it; import mmreparam)')
    scales = load(source)
    check_scales(scales, backbone, describe_source(source))
    return scales


def copy_scales(scales: Scales) -> Scales:
    """Detached copies of the tensors of ``scales``."""
    return {name: {key: value.detach().clone() for key, value in entry.items()}
            for name, entry in scales.items()}


def same_scales(a: Scales, b: Scales) -> bool:
    """Whether two scales dicts have the same blocks, keys and values."""
    if a.keys() != b.keys():
        return False
    return all(a[name].keys() == b[name].keys() and all(
        torch.equal(a[name][key].double().cpu(), b[name][key].double().cpu())
        for key in a[name]) for name in a)


__all__ = ['Scales', 'ScalesSource', 'SCALES_LOADERS', 'ScalesError', 'describe_source',
           'validate_scales', 'constant_scales', 'check_scales', 'resolve_scales',
           'copy_scales', 'same_scales']
