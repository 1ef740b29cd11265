"""Atomic file writing: a reader sees the previous file or the complete new one, never a part.

Used for every file mmreparam writes (deploy checkpoints and configs, converted checkpoints,
scales files, ONNX exports, metrics), by the library and the tools alike.

A write goes to a hidden temporary file beside the target (``.NAME.tmp.PID.XXXX``), is
flushed to disk, then renamed onto the target. The file gets the permissions ``open()`` gives
a new file (``0o666`` less the process umask, e.g. ``0o644``), so that other users (a serving
process, CI) read what the trainer wrote as they read mmengine's checkpoints beside it.

On an exception, a KeyboardInterrupt or a SIGTERM during the write, the temporary file is
removed and the target is left as it was; the SIGTERM is then delivered as before (it still
ends the process). A SIGKILL cannot be caught: it leaves the temporary file, which the next
write to the same target removes.
"""
import contextlib
import os
import secrets
import signal
import threading
from typing import Any, Callable, Dict

import torch

_TMP_MARK = '.tmp.'


class _Terminated(BaseException):
    """Raised by the SIGTERM handler that :func:`atomic_write` installs while it writes."""


@contextlib.contextmanager
def _sigterm_as_exception():
    """Turn a SIGTERM into :class:`_Terminated` for the duration of the block.

    Only in the main thread (the only one that may set handlers). After the block, the
    previous handler is restored and a SIGTERM that arrived is raised again, so the
    process ends (or its own handler runs) as it would have; if that handler returns,
    :class:`InterruptedError` is raised (the write did not happen).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    terminated = False
    try:
        yield
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    if terminated:
        signal.raise_signal(signal.SIGTERM)
        # The previous handler returned instead of ending the process: still an error.
        raise InterruptedError('terminated (SIGTERM) during the write')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str) -> int:
    """Remove the temporary files of earlier writes to ``path`` whose process is gone.

    Such files exist only when a writer was killed by a signal that cannot be caught
    (SIGKILL, the out-of-memory killer). Returns the number removed.
    """
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f'.{name}{_TMP_MARK}'
    removed = 0
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix):].split('.', 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, entry))
                removed += 1
    return removed


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, 'O_DIRECTORY', 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def _create_temporary(path: str) -> str:
    """Create the empty temporary file for ``path`` beside it; return its name.

    Created with mode ``0o666`` and ``O_EXCL``, so the kernel applies the umask as for any
    new file (``tempfile.mkstemp`` would give ``0o600``) and no other file is reused.
    """
    directory, name = os.path.split(os.path.abspath(path))
    suffix = os.path.splitext(name)[1]
    while True:
        tmp = os.path.join(directory, f'.{name}{_TMP_MARK}{os.getpid()}.'
                                      f'{secrets.token_hex(4)}{suffix}')
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it onto ``path``.

    On any failure (an exception, KeyboardInterrupt, SIGTERM) the temporary file is removed
    and the previous ``path`` (if any) is left untouched; the error propagates. The new
    file has the mode ``open()`` gives a new file: ``0o666`` less the umask.

    Args:
        path (str): The file to write. Its folder is created if needed.
        write (callable): Writes the content to the path it is given. The temporary file
            has the extension of ``path``, since writers such as ``Config.dump`` pick the
            format from it.
    """
    atomic_write_files({path: write})


def atomic_write_files(writers: Dict[str, Callable[[str], Any]]) -> None:
    """Write several files as one: all are written to temporary files first, and only when
    every one is complete are they renamed onto their targets.

    A failure while writing any of them leaves all targets as they were (see
    :func:`atomic_write`); e.g. a deploy checkpoint is never replaced without its config.

    Args:
        writers (dict): ``{path: write}``, as the arguments of :func:`atomic_write`.
    """
    temporaries = {}
    try:
        with _sigterm_as_exception():
            try:
                for path, write in writers.items():
                    directory = os.path.dirname(os.path.abspath(path))
                    os.makedirs(directory, exist_ok=True)
                    remove_stale_temporaries(path)
                    tmp = temporaries[path] = _create_temporary(path)
                    write(tmp)
                    _fsync(tmp)
                for path, tmp in temporaries.items():
                    os.replace(tmp, path)
            except BaseException:
                _remove(temporaries.values())
                raise
        for directory in {os.path.dirname(os.path.abspath(p)) for p in temporaries}:
            _fsync(directory, directory=True)
    finally:
        _remove(temporaries.values())  # only left when SIGTERM came between two steps


def _remove(paths) -> None:
    for path in paths:
        if os.path.exists(path):
            with contextlib.suppress(OSError):
                os.remove(path)


def save_checkpoint_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


__all__ = ['atomic_write', 'atomic_write_files', 'save_checkpoint_atomic',
           'remove_stale_temporaries']
