"""RepOptimizer scales files: read a scales source (a scales file or a hyper-search
checkpoint, on disk or loaded), write a scales file.

A scales file is ``{'scales': <scales dict>, 'meta': {...}}`` (:func:`save_scales`; the
scales dict as in :mod:`mmreparam.models.backbones.repopt_scales`). :func:`load_scales` also
reads HS checkpoints, mmreparam's (``RepOptVGG(mode='hs')``, alone or as ``backbone.`` of a
classifier) and the official ones (``stage0.scale_conv.weight`` ...), e.g. the released
``RepOpt-VGG-B1-scales.pth``. It is put in
:data:`~mmreparam.models.backbones.repopt_scales.SCALES_LOADERS`, through which
``RepOptVGG(scales=PATH)`` reads its file.
"""
import os
import re
from typing import Mapping, Optional, Union

from ...checkpoint import read_state_dict, safe_load
from ...errors import CheckpointError
from ...fileio import save_checkpoint_atomic
from ...models.backbones.repopt_scales import (
    SCALES_LOADERS,
    Scales,
    ScalesError,
    ScalesSource,
    describe_source,
    validate_scales,
)

#: ``meta['format']`` of the files written by :func:`save_scales`.
SCALES_FORMAT = 'mmreparam.repopt_scales'
# A scale of an HS block: ``<block>.scale_<branch>.weight`` (CSLABlock's and the official
# LinearAddBlock's names), with the branch names of the scales dict.
_HS_KEY = re.compile(r'^(.+)\.scale_(conv|1x1|identity)\.weight$')
_HS_BRANCHES = {'conv': 'conv', '1x1': 'conv_1x1', 'identity': 'identity'}
_OFFICIAL_STAGE = re.compile(r'^stage([1-9]\d*)\.(\d+)$')


def _block_name(name: str) -> str:
    """An HS block name in mmreparam's naming (official: ``stage0``, ``stage1.0``)."""
    if name == 'stage0':
        return 'stem'
    official = _OFFICIAL_STAGE.match(name)
    return 'stage_{}.{}'.format(*official.groups()) if official else name


def _scales_of_checkpoint(checkpoint: Mapping, source: str) -> Scales:
    """The ``scale_*.weight`` tensors of an HS checkpoint (mmreparam's or the official)."""
    try:
        state, _ = read_state_dict(checkpoint)
    except CheckpointError:
        state = {}
    scales: Scales = {}
    for key, value in state.items():
        match = _HS_KEY.match(key)
        if match:
            block, branch = match.groups()
            scales.setdefault(_block_name(block), {})[_HS_BRANCHES[branch]] = value
    if not scales:
        raise ScalesError(
            f"{source} is neither a scales file (no 'scales' dict) nor a hyper-search "
            f"checkpoint (no '*.scale_conv.weight' keys); its keys look like "
            f'{sorted(map(str, state or checkpoint))[:4]}')
    return validate_scales(scales, source)


def load_scales(source: ScalesSource) -> Scales:
    """Read RepOpt scales from a file or a loaded object.

    Accepts a scales file (:func:`save_scales`), a scales dict, and hyper-search
    checkpoints: mmreparam's (an ``mode='hs'`` RepOptVGG, alone or as ``backbone.`` of a
    classifier) and the official ones (``stage0.scale_conv.weight``, ``stage1.0....``,
    under ``'model'`` or not), e.g. the released ``RepOpt-VGG-B1-scales.pth``. Files are
    read with :func:`mmreparam.checkpoint.safe_load`.

    Args:
        source (str | PathLike | Mapping): The file or object.

    Returns:
        dict: ``{block name: {'conv', 'conv_1x1'[, 'identity']: float32 tensor}}``.

    Raises:
        FileNotFoundError: The file does not exist.
        ScalesError: Unreadable, or no valid scales in it.
    """
    name = describe_source(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f'{name} does not exist')
        try:
            obj = safe_load(source)
        except CheckpointError as err:
            raise ScalesError(f'cannot read {name}: {err}') from err
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise ScalesError(f'{name} holds a {type(obj).__name__}, not a dict')
    if isinstance(obj.get('scales'), Mapping):
        return validate_scales(obj['scales'], name)
    if obj and all(isinstance(v, Mapping) and 'conv' in v for v in obj.values()):
        return validate_scales(obj, name)  # a bare scales dict
    return _scales_of_checkpoint(obj, name)


SCALES_LOADERS['load_scales'] = load_scales


def save_scales(scales: Scales, path: Union[str, os.PathLike],
                meta: Optional[dict] = None) -> None:
    """Write a scales file atomically (``{'scales': ..., 'meta': ...}``, float32, CPU).

    Args:
        scales (dict): Block name -> ``{'conv', 'conv_1x1'[, 'identity']: tensor}``.
        path (str | PathLike): Output file; a previous file is replaced only on success.
        meta (dict, optional): Extra plain-Python metadata (arch, source, ...).
    """
    scales = validate_scales(scales, 'scales to save')
    save_checkpoint_atomic(dict(scales=scales, meta=dict(meta or {}, format=SCALES_FORMAT)),
                           os.fspath(path))


__all__ = ['SCALES_FORMAT', 'load_scales', 'save_scales']
