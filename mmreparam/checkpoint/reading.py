"""Reading a checkpoint's tensors: fetch remote files safely, unwrap, strip ``module.`` and a
key prefix, refuse non-finite values.

Every checkpoint, local or remote, is unpickled by :func:`~.safe_load.safe_load`. Remote
ones (``http(s)://``, the model-zoo names mmengine knows such as ``torchvision://`` and
``open-mmlab://``, and mmengine's file backends such as ``s3://``) are only *downloaded*
here: mmengine's own loader would unpickle a URL through ``torch.hub``'s
``load_state_dict_from_url``, whose ``weights_only`` defaults to False (a pickle in that file
runs code). Downloads go to torch hub's cache (``torch.hub.get_dir()/checkpoints``, where
``load_state_dict_from_url`` puts them) and are reused from there; a downloaded file that
is refused is removed from the cache.

:func:`register_safe_loaders` (run when mmreparam is imported) makes mmengine's
``CheckpointLoader`` read local files, URLs, model-zoo names and ``s3://`` / ``petrel://``
paths the same way, so that
``load_from``, ``--resume``, ``tools/test.py CONFIG CKPT`` and mmengine's own
``Pretrained`` init are safe too.
"""
import io
import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from mmengine.logging import print_log
from torch import Tensor

from ..errors import CheckpointError
from .safe_load import safe_load

StateDict = Dict[str, Tensor]

#: The model-zoo schemes mmengine resolves to a URL (or a file under its home).
_ZOO_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')
#: mmengine's ``CheckpointLoader`` prefixes (regular expressions) of its ``load_from_ceph``.
_FILE_BACKEND_SCHEMES = (r'(\S+\:)?s3://', r'(\S+\:)?petrel://')
#: How many offending keys a message names.
_NAMED_KEYS = 3


def _zoo_url(path: str) -> str:
    """The URL (or file under mmengine's home) of a model-zoo name, as mmengine resolves it."""
    from mmengine.runner import checkpoint as mm
    scheme, name = path.split('://', 1)
    if scheme in ('torchvision', 'modelzoo'):
        urls = mm.get_torchvision_models()
    elif scheme == 'mmcls':
        urls = mm.get_mmcls_models()
    else:
        urls = mm.get_external_models()
        name = mm.get_deprecated_model_names().get(name, name)
    if name not in urls:
        raise CheckpointError(f'unknown model name {path!r}: mmengine knows no {scheme}:// '
                              f'checkpoint called {name!r}')
    url = urls[name]
    if '://' not in url:  # open-mmlab names may point into mmengine's home
        url = os.path.join(mm._get_mmengine_home(), url)
    return url


def _download(url: str) -> str:
    """Download ``url`` into torch hub's cache (unless it is there) and return the file.

    In a distributed run, rank 0 downloads and the others wait, as mmengine does.
    """
    from mmengine.dist import barrier, get_dist_info
    name = os.path.basename(urlparse(url).path) or 'checkpoint.pth'
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(cache, name)
    rank, world_size = get_dist_info()
    if rank == 0 and not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        print_log(f'downloading {url} to {path}', logger='current')
        try:  # writes a temporary file in the cache and moves it into place when complete
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception as err:
            raise CheckpointError(f'cannot download checkpoint {url!r}: {err}') from err
    elif rank == 0:
        print_log(f'using {path}, downloaded earlier from {url}', logger='current')
    if world_size > 1:
        barrier()
    if not os.path.exists(path):
        raise CheckpointError(f'cannot download checkpoint {url!r} (rank 0 did not)')
    return path


def _load_downloaded(path: str, map_location: Any = 'cpu') -> object:
    """``safe_load`` a downloaded file; a refused one is removed from the cache."""
    try:
        return safe_load(path, map_location=map_location)
    except CheckpointError:
        try:
            os.remove(path)
        except OSError:
            pass
        raise


def read_checkpoint(checkpoint: Union[str, os.PathLike], map_location: Any = 'cpu') -> object:
    """Load a checkpoint file or URL with :func:`~.safe_load.safe_load`.

    Args:
        checkpoint (str | PathLike): A local file; an ``http(s)://`` URL; a model-zoo name
            mmengine resolves (``torchvision://resnet50``, ``open-mmlab://...``,
            ``mmcls://...``); or a path of another mmengine file backend (``s3://...``).
        map_location: As for ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        The unpickled checkpoint.

    Raises:
        CheckpointError: The download failed, or the file is unreadable, unsafe or
            corrupted.
        FileNotFoundError: A local file does not exist.
    """
    path = os.fspath(checkpoint)
    if '://' not in path or os.path.exists(path):
        return safe_load(os.path.expanduser(path), map_location=map_location)
    if path.startswith(_ZOO_SCHEMES):
        path = _zoo_url(path)
        if '://' not in path:
            return safe_load(path, map_location=map_location)
    if path.startswith(('http://', 'https://')):
        return _load_downloaded(_download(path), map_location)
    from mmengine.fileio import get_file_backend
    try:  # s3://, petrel:// ...: the bytes through mmengine's backend, unpickled here
        data = get_file_backend(path).get(path)
    except Exception as err:
        raise CheckpointError(f'cannot read checkpoint {path!r}: {err}') from err
    return safe_load(io.BytesIO(data), map_location=map_location)


def load_from_mmreparam_safe(filename: str, map_location: Any = None) -> object:
    """mmengine's ``CheckpointLoader`` scheme for files, URLs, model-zoo names and
    ``s3://`` / ``petrel://`` paths (its log line says "by mmreparam_safe backend")."""
    checkpoint = read_checkpoint(filename, map_location)
    if filename.startswith('mmcls://'):
        from mmengine.runner.checkpoint import _process_mmcls_checkpoint
        checkpoint = _process_mmcls_checkpoint(checkpoint)
    return checkpoint


def register_safe_loaders() -> None:
    """Read every checkpoint mmengine's ``CheckpointLoader`` loads through
    :func:`read_checkpoint`: local files, ``http(s)://`` URLs, the model-zoo names and
    ``s3://`` / ``petrel://`` paths.

    mmengine unpickles URLs with ``torch.hub.load_state_dict_from_url``, whose
    ``weights_only`` defaults to False, and ``s3://`` / ``petrel://`` files with a plain
    ``torch.load`` (False too before torch 2.6); this replaces those schemes (and the local
    one, which then gets the CRC check) with the safe loader, under mmengine's own prefixes
    so that they are replaced, not shadowed. Idempotent; run when mmreparam is imported.
    ``pavi://`` (a closed backend that loads through its own client) is left to mmengine.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    prefixes = ['', 'http://', 'https://', *_ZOO_SCHEMES, *_FILE_BACKEND_SCHEMES]
    CheckpointLoader.register_scheme(prefixes=prefixes, force=True)(load_from_mmreparam_safe)


def nonfinite_keys(state: Mapping[str, Tensor]) -> list:
    """The keys of ``state`` whose floating-point tensor holds a NaN or an infinity."""
    return [key for key, value in state.items()
            if (value.is_floating_point() or value.is_complex())
            and not bool(torch.isfinite(value).all())]


def check_finite(state: Mapping[str, Tensor], source: str = 'checkpoint') -> None:
    """Refuse a state_dict with NaN or Inf values (a diverged training run, a damaged file).

    Args:
        state (Mapping[str, Tensor]): The tensors.
        source (str): The checkpoint in words, for the message.

    Raises:
        CheckpointError: Naming the first offending keys.
    """
    bad = nonfinite_keys(state)
    if bad:
        more = f' and {len(bad) - _NAMED_KEYS} more' if len(bad) > _NAMED_KEYS else ''
        raise CheckpointError(
            f'{source} has NaN or Inf values in {len(bad)} tensor(s): '
            f'{", ".join(bad[:_NAMED_KEYS])}{more}; refused (allow_nonfinite=True loads it '
            'anyway)')


def describe_checkpoint(checkpoint) -> str:
    """A checkpoint argument in words, for messages: ``"checkpoint 'a.pth'"``."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return f'checkpoint {os.fspath(checkpoint)!r}'
    return 'checkpoint (loaded state_dict)'


def read_state_dict(checkpoint: Union[str, os.PathLike, Mapping],
                    prefix: Optional[str] = None) -> Tuple[StateDict, Optional[str]]:
    """Read the tensors of a checkpoint: unwrap, strip ``module.`` and the prefix.

    Args:
        checkpoint (str | PathLike | Mapping): A file, a URL (see :func:`read_checkpoint`),
            or an already loaded checkpoint / state_dict.
        prefix (str, optional): Keep only the keys under this prefix (e.g. ``'backbone.'``)
            and strip it. None strips ``backbone.`` when the checkpoint is a whole model.

    Returns:
        tuple[dict, str | None]: The state_dict and the prefix that was applied.

    Raises:
        CheckpointError: Unreadable file, no tensors, or no key under ``prefix``.
    """
    name = describe_checkpoint(checkpoint)
    obj = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{name} holds a {type(obj).__name__}, not a state_dict')
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
        raise CheckpointError(f'{name} holds no tensors (expected a state_dict, or a dict '
                              "with 'state_dict' or 'model')")
    if prefix is None and any(key.startswith('backbone.') for key in state):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        selected = {key[len(prefix):]: value for key, value in state.items()
                    if key.startswith(prefix)}
        if not selected:
            raise CheckpointError(f'{name}: no checkpoint key starts with prefix {prefix!r}; '
                                  f'keys look like {sorted(state)[:3]}')
        state = selected
    skipped = [key for key, value in obj.items()
               if isinstance(value, Tensor) and not isinstance(key, str)]
    if skipped:
        print_log(f'{name}: {len(skipped)} tensor(s) under non-string keys ignored',
                  logger='current', level=logging.WARNING)
    return state, prefix or None


__all__ = ['StateDict', 'check_finite', 'describe_checkpoint', 'nonfinite_keys',
           'read_checkpoint', 'read_state_dict', 'register_safe_loaders']
