"""Safe checkpoint loading: torch's ``weights_only`` unpickler with a minimal allow-list.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 relies on that
default, so mmengine's own checkpoints (which pickle ``HistoryBuffer`` objects and numpy
arrays in the message hub) fail to reload in ``tools/test.py`` and ``--resume``.
:func:`register_safe_globals`, run when mmreparam is imported, allow-lists exactly the
objects those checkpoints contain. ``weights_only`` stays on: a checkpoint whose pickle would
call anything else (``os.system``, ``eval``, ...) is still refused.

``HistoryBuffer`` pickles its statistic methods as ``getattr(HistoryBuffer, 'min')`` (pickle
protocol 2 cannot name a method directly), so torch asks for ``builtins.getattr``. Allowing
the real ``getattr`` would let a checkpoint reach any attribute of any object it can build;
instead ``builtins.getattr`` is mapped to :func:`_restricted_getattr`, which returns only
those four methods of ``HistoryBuffer`` and refuses everything else.
"""
import _codecs
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from ..errors import CheckpointError, UnsafeCheckpointError

_HISTORY_BUFFER_METHODS = frozenset({'min', 'max', 'mean', 'current'})


def _restricted_getattr(obj: Any, name: str) -> Any:
    """``getattr`` for unpickling: only ``HistoryBuffer``'s statistic methods."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refused getattr({obj!r}, {name!r}): mmreparam only allows '
        f'getattr(HistoryBuffer, {sorted(_HISTORY_BUFFER_METHODS)})')


def _numpy_globals() -> list:
    """numpy reconstructors and types, under both numpy 1.x and 2.x module paths."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    reconstruct = multiarray._reconstruct
    scalar = multiarray.scalar
    entries = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(reconstruct, f'{module}._reconstruct'), (scalar, f'{module}.scalar')]
    # dtype classes (numpy >= 1.25 pickles dtypes as numpy.dtypes.Float64DType etc.)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')]
    return entries


def safe_globals() -> list:
    """The allow-list mmreparam adds to torch's ``weights_only`` unpickler."""
    return [HistoryBuffer, (_restricted_getattr, 'builtins.getattr'),
            (_codecs.encode, '_codecs.encode'), *_numpy_globals()]


def _quiet_safe_globals() -> list:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        return safe_globals()


def register_safe_globals() -> None:
    """Allow mmengine's own checkpoints through ``torch.load(weights_only=True)``.

    Idempotent; called when mmreparam is imported. A no-op before torch 2.4, which has no
    allow-list to extend (and whose ``torch.load`` does not default to ``weights_only``).
    """
    if hasattr(torch.serialization, 'add_safe_globals'):
        torch.serialization.add_safe_globals(_quiet_safe_globals())


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that builds only allow-listed globals: torch's own ``weights_only``
    list plus :func:`safe_globals`. For torch < 2.4, whose ``weights_only`` unpickler
    cannot be extended."""

    allowed: dict = {}

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle  # protocol-2 pickles name builtins '__builtin__'
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        found = self.allowed.get(f'{module}.{name}')
        if found is None:
            raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {module}.{name} is not '
                                         'on the allow-list')
        return found


def _allow_list_pickle_module():
    """A ``pickle_module`` for ``torch.load`` whose unpickler is :class:`_AllowListUnpickler`."""
    from torch import _weights_only_unpickler
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for entry in _quiet_safe_globals():
        obj, key = entry if isinstance(entry, tuple) else (
            entry, f'{entry.__module__}.{entry.__qualname__}')
        allowed[key] = obj

    class Unpickler(_AllowListUnpickler):
        pass

    Unpickler.allowed = allowed

    class Module:
        __name__ = 'mmreparam_allow_list_pickle'
        Unpickler = None

        @staticmethod
        def load(file, **kwargs):
            return Module.Unpickler(file, **kwargs).load()

    Module.Unpickler = Unpickler
    return Module


def _torch_load(source, map_location='cpu'):
    if hasattr(torch.serialization, 'add_safe_globals'):
        register_safe_globals()
        return torch.load(source, map_location=map_location, weights_only=True)
    return torch.load(source, map_location=map_location,
                      pickle_module=_allow_list_pickle_module())


def _source_name(source: Union[str, os.PathLike, io.IOBase]) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else 'stream'


def verify_zip_crc(source: Union[str, os.PathLike, io.IOBase], name: str = 'stream') -> None:
    """Check the CRC-32 of every member of a zip-format checkpoint (torch >= 1.6 writes one).

    torch reads the members' bytes without checking their checksums, so one flipped bit in
    a tensor's data would load silently as a wrong value. A file that is not a zip (torch's
    legacy format) has no checksums and passes unchecked.

    Args:
        source (str | PathLike | file): The checkpoint (a seekable stream is rewound).
        name (str): The checkpoint in words, for the message.

    Raises:
        CheckpointError: A member's data does not match its CRC-32, or the zip's own
            structure is damaged.
    """
    stream = not isinstance(source, (str, os.PathLike))
    start = source.tell() if stream else 0
    try:
        if not zipfile.is_zipfile(source):
            return
        if stream:
            source.seek(start)
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f'checkpoint {name} is corrupted: its zip structure is '
                              f'damaged ({_first_sentence(err)})') from err
    finally:
        if stream:
            source.seek(start)
    if bad is not None:
        raise CheckpointError(f'checkpoint {name} is corrupted: the data of {bad!r} does not '
                              'match its CRC-32 checksum (damaged download or disk)')


def safe_load(source: Union[str, os.PathLike, io.IOBase], verify_crc: bool = True,
              map_location: Any = 'cpu') -> Any:
    """Load a checkpoint on the CPU with the ``weights_only`` unpickler (before torch 2.4:
    an unpickler with the same allow-list), after checking its checksums.

    Args:
        source (str | PathLike | file): The checkpoint.
        verify_crc (bool): Check the CRC-32 of a zip-format checkpoint's members first
            (:func:`verify_zip_crc`; reads the file once more). Defaults to True.
        map_location: As for ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        The unpickled object (usually a dict).

    Raises:
        FileNotFoundError: The file does not exist.
        UnsafeCheckpointError: The pickle asks for a global outside the allow-list.
        CheckpointError: The file is truncated, corrupted, empty or not a PyTorch
            checkpoint.
    """
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise FileNotFoundError(f'checkpoint {name} does not exist')
        if os.path.isdir(source):
            raise CheckpointError(f'checkpoint {name} is a directory, not a file')
        if os.path.getsize(source) == 0:
            raise CheckpointError(f'checkpoint {name} is empty')
    if verify_crc:
        verify_zip_crc(source, name)
    try:
        return _torch_load(source, map_location)
    except pickle.UnpicklingError as err:
        text = str(err)
        for marker in ('Unsupported global', 'unrecognized function', 'Can only',
                       'refused getattr', 'blocked'):
            if marker in text:
                detail = next((line.strip() for line in text.splitlines()
                               if marker in line), text)
                raise UnsafeCheckpointError(
                    f'refused to load checkpoint {name}: its pickle asks for code that is '
                    f'not allowed ({detail})') from err
        raise CheckpointError(f'checkpoint {name} is not a readable PyTorch checkpoint '
                              f'(truncated or another format): {_first_sentence(err)}'
                              ) from err
    except Exception as err:  # the unpickler fails in many ways on foreign bytes
        raise CheckpointError(f'checkpoint {name} is not a readable PyTorch checkpoint '
                              f'(truncated or another format): {_first_sentence(err)}'
                              ) from err


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an error's message, with its type (loaders' messages are long
    or terse: a bare ``101`` is the byte the unpickler choked on)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ''
    text = text.split('. ')[0].rstrip('.')
    return f'{type(err).__name__}: {text}' if text else type(err).__name__
