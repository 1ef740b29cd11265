"""tools/slurm_train.sh and slurm_test.sh build mmdet's srun command line (no Slurm here: a
stub ``srun`` on PATH records the arguments it is given, one per line)."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / 'tools'
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$SRUN_LOG"
echo "PYTHONPATH=$PYTHONPATH" >> "$SRUN_LOG.env"
"""


def run_script(tmp_path, script, args, **env):
    """Run ``tools/<script>`` with a recording ``srun`` first on PATH; returns the process
    and the arguments srun received (None when it was not called)."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / 'srun').write_text(STUB)
    (bin_dir / 'srun').chmod(0o755)
    log = tmp_path / 'srun.log'
    full_env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'SRUN_LOG': str(log),
                'PYTHON': sys.executable, **env}
    proc = subprocess.run(['bash', str(TOOLS / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else None


def srun_options(gpus, per_node, cpus, job='job'):
    return ['-p', 'part', f'--job-name={job}', f'--gres=gpu:{per_node}', f'--ntasks={gpus}',
            f'--ntasks-per-node={per_node}', f'--cpus-per-task={cpus}', '--kill-on-bad-exit=1']


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_scripts_parse(script):
    proc = subprocess.run(['bash', '-n', str(TOOLS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(TOOLS / script, os.X_OK)


def test_slurm_train_defaults(tmp_path):
    proc, argv = run_script(tmp_path, 'slurm_train.sh',
                            ['part', 'job', 'configs/x.py', 'work_dirs/x'])
    assert proc.returncode == 0, proc.stderr
    assert argv == [*srun_options(8, 8, 5), sys.executable, '-u', str(TOOLS / 'train.py'),
                    'configs/x.py', '--work-dir=work_dirs/x', '--launcher=slurm']
    # The repository goes first on the tasks' PYTHONPATH, as in mmdet's script.
    env_lines = (tmp_path / 'srun.log.env').read_text().splitlines()
    assert env_lines == [f'PYTHONPATH={TOOLS}/..:']


def test_slurm_train_env_knobs_and_extra_arguments(tmp_path):
    proc, argv = run_script(
        tmp_path, 'slurm_train.sh',
        ['part', 'my job', 'configs/a b.py', 'work dir', '--resume', '--cfg-options',
         'train_cfg.max_epochs=1'],
        GPUS='16', GPUS_PER_NODE='4', CPUS_PER_TASK='3', SRUN_ARGS='--quotatype=auto --exclusive')
    assert proc.returncode == 0, proc.stderr
    # SRUN_ARGS is split into srun options; every positional argument stays one word.
    assert argv == [*srun_options(16, 4, 3, job='my job'), '--quotatype=auto', '--exclusive',
                    sys.executable, '-u', str(TOOLS / 'train.py'), 'configs/a b.py',
                    '--work-dir=work dir', '--launcher=slurm', '--resume', '--cfg-options',
                    'train_cfg.max_epochs=1']


def test_slurm_test_command(tmp_path):
    args = ['part', 'job', 'configs/x.py', 'ckpt.pth', '--metrics-json', 'm.json']
    proc, argv = run_script(tmp_path, 'slurm_test.sh', args, GPUS='2', GPUS_PER_NODE='2')
    assert proc.returncode == 0, proc.stderr
    assert argv == [*srun_options(2, 2, 5), sys.executable, '-u', str(TOOLS / 'test.py'),
                    'configs/x.py', 'ckpt.pth', '--launcher=slurm', '--metrics-json', 'm.json']


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
def test_missing_arguments_stop_before_srun(tmp_path, script):
    proc, argv = run_script(tmp_path, script, ['part', 'job', 'configs/x.py'])
    assert proc.returncode == 2
    assert 'usage:' in proc.stderr
    assert argv is None


@pytest.mark.parametrize('toolbox', ['mmdet', 'mmseg', 'mmpretrain'])
def test_upstream_tools_accept_the_slurm_launcher(toolbox, monkeypatch):
    """tools/train.py and test.py pass --launcher on to the toolbox's own script (through
    mmreparam.cli.toolbox): its parser must take --launcher=slurm."""
    from mmreparam.cli.toolbox import upstream_tool
    for name, positional in (('train.py', ['cfg.py']), ('test.py', ['cfg.py', 'ckpt.pth'])):
        script = upstream_tool(toolbox, name)
        monkeypatch.setattr(sys, 'argv', [script, *positional, '--launcher=slurm'])
        args = runpy.run_path(script)['parse_args']()
        assert args.launcher == 'slurm', (toolbox, name)
