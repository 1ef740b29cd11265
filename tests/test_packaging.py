"""Installing mmreparam into an environment that has its dependencies changes nothing else."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_install_requires_are_ranges_not_pins():
    lines = [line.split('#')[0].strip()
             for line in (ROOT / 'requirements' / 'install.txt').read_text().splitlines()]
    requirements = [line for line in lines if line]
    assert requirements and not [r for r in requirements if '==' in r], requirements
    assert {re.split('[<>=!~ ]', r)[0] for r in requirements} >= {'torch', 'mmengine'}


def test_pip_would_install_only_mmreparam_here():
    """pip's dry run against this environment (a pinned stack of make test or make
    test-compat), offline: the ranges are satisfied, nothing is upgraded or replaced."""
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index',
         '--no-build-isolation', '--disable-pip-version-check', str(ROOT)],
        capture_output=True, text=True, timeout=600,
        env={'MMREPARAM_WITH_OPS': '0', 'PATH': '/usr/bin:/bin'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    would = [line for line in proc.stdout.splitlines() if line.startswith('Would install')]
    assert len(would) == 1, proc.stdout[-2000:]
    assert would[0].split()[2:] == [f'mmreparam-{mmreparam_version()}'], would


def mmreparam_version():
    text = (ROOT / 'mmreparam' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)
