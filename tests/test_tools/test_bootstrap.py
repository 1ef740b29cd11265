"""tools/bootstrap.sh checks the disk before it installs anything: a full disk is one clear
error at once, not pip's OSError after minutes with a half-installed venv left behind."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bootstrap(venv, need_gib):
    env = dict(os.environ, VENV=str(venv), NEED_GIB=str(need_gib))
    return subprocess.run(['bash', str(ROOT / 'tools' / 'bootstrap.sh')], capture_output=True,
                          text=True, timeout=60, env=env)


def test_not_enough_disk_space_is_refused_before_anything_is_created(tmp_path):
    venv = tmp_path / 'new' / 'venv'
    proc = bootstrap(venv, 10**9)  # no disk has a billion GiB free
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        f'[bootstrap] not enough disk space for {venv}: a complete environment takes about '
        '1000000000 GiB (0 GiB of it there already), and its filesystem has ')
    assert 'set VENV to a directory on another disk' in proc.stderr
    assert '[bootstrap] 1/6' not in proc.stdout  # no step started
    assert not (tmp_path / 'new').exists()  # nothing created to look at the disk


@pytest.mark.parametrize('need', ['x', '-1', '2.5', '8G'])
def test_a_need_that_is_not_a_whole_number_is_refused(tmp_path, need):
    proc = bootstrap(tmp_path / 'venv', need)
    assert proc.returncode == 1
    assert proc.stderr == (f"[bootstrap] NEED_GIB must be a whole number of GiB, not '{need}'\n")
    assert not (tmp_path / 'venv').exists()
