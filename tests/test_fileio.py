"""Atomic writes under faults: exceptions, KeyboardInterrupt, SIGTERM and SIGKILL."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mmreparam.fileio import (
    atomic_write,
    atomic_write_files,
    remove_stale_temporaries,
    save_checkpoint_atomic,
)


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def write_partial_then(error):
    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise error
    return write


@pytest.mark.parametrize('error', [OSError(28, 'No space left on device (injected)'),
                                   KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, error):
    path = str(tmp_path / 'deploy.pth')
    save_checkpoint_atomic({'v': torch.ones(3)}, path)
    with pytest.raises(type(error)):
        atomic_write(path, write_partial_then(error))
    assert torch.equal(torch.load(path, weights_only=True)['v'], torch.ones(3))
    assert names(tmp_path) == ['deploy.pth']


def test_several_files_are_written_as_one(tmp_path):
    ckpt, cfg = tmp_path / 'deploy.pth', tmp_path / 'deploy_config.py'
    atomic_write_files({str(ckpt): lambda t: torch.save({'v': 1}, t),
                        str(cfg): lambda t: open(t, 'w').write('a = 1\n')})
    assert cfg.read_text() == 'a = 1\n'
    # The second file fails: the first is not replaced either.
    with pytest.raises(OSError, match='injected'):
        atomic_write_files({str(ckpt): lambda t: torch.save({'v': 2}, t),
                            str(cfg): write_partial_then(OSError('disk full (injected)'))})
    assert torch.load(ckpt, weights_only=True) == {'v': 1}
    assert cfg.read_text() == 'a = 1\n'
    assert names(tmp_path) == ['deploy.pth', 'deploy_config.py']


def test_the_folder_is_created_and_an_impossible_folder_fails_cleanly(tmp_path):
    atomic_write(str(tmp_path / 'a' / 'b' / 'x.txt'), lambda t: open(t, 'w').write('x'))
    assert (tmp_path / 'a' / 'b' / 'x.txt').read_text() == 'x'
    blocker = tmp_path / 'file'
    blocker.write_text('')
    with pytest.raises(OSError):
        atomic_write(str(blocker / 'x.txt'), lambda t: open(t, 'w').write('x'))


WRITER = textwrap.dedent('''
    import os, signal, sys, time
    from mmreparam.fileio import atomic_write

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        print('writing', flush=True)
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(30)

    atomic_write(sys.argv[1], write)
    print('not reached', flush=True)
''')


def run_writer(tmp_path, signame):
    target = tmp_path / 'out' / 'deploy.pth'
    proc = subprocess.run([sys.executable, '-c', WRITER, str(target), signame],
                          capture_output=True, text=True, timeout=120)
    return proc, target


def test_sigterm_during_the_write_leaves_nothing_and_still_ends_the_process(tmp_path):
    proc, target = run_writer(tmp_path, 'SIGTERM')
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert 'writing' in proc.stdout and 'not reached' not in proc.stdout
    assert names(target.parent) == []


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_write(tmp_path):
    proc, target = run_writer(tmp_path, 'SIGKILL')
    assert proc.returncode == -signal.SIGKILL
    left = names(target.parent)
    assert len(left) == 1 and left[0].startswith('.deploy.pth.tmp.'), left
    assert not target.exists()  # the target itself is never half-written
    # A live writer's temporary is not touched; a dead one's is.
    live = target.parent / f'.deploy.pth.tmp.{os.getpid()}.abc.pth'
    live.write_bytes(b'')
    assert remove_stale_temporaries(str(target)) == 1
    assert names(target.parent) == [live.name]
    live.unlink()
    proc, _ = run_writer(tmp_path, 'SIGKILL')
    time.sleep(0.1)
    save_checkpoint_atomic({'v': 1}, str(target))
    assert names(target.parent) == ['deploy.pth']


@pytest.fixture
def umask():
    """Set the process umask for a test; restore it afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize('mask,mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_open_gives_a_new_file(tmp_path, umask, mask, mode):
    """0o666 less the umask, as open() and mmengine's checkpoints beside them (was 0o600)."""
    umask(mask)
    save_checkpoint_atomic({'v': 1}, str(tmp_path / 'deploy.pth'))
    atomic_write_files({str(tmp_path / 'a.json'): lambda t: open(t, 'w').write('{}'),
                        str(tmp_path / 'deploy_config.py'): lambda t: open(t, 'w').write('')})
    with open(tmp_path / 'reference', 'w'):
        pass
    assert (tmp_path / 'reference').stat().st_mode & 0o777 == mode
    for name in ('deploy.pth', 'a.json', 'deploy_config.py'):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    # A rewrite gives the same mode (the target's old mode is not kept: an old 0o600 goes).
    os.chmod(tmp_path / 'deploy.pth', 0o600)
    save_checkpoint_atomic({'v': 2}, str(tmp_path / 'deploy.pth'))
    assert (tmp_path / 'deploy.pth').stat().st_mode & 0o777 == mode
