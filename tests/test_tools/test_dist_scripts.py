"""tools/dist_train.sh and dist_test.sh on bad input: a usage line, or one error line from a
check made once before torchrun starts (no torchrun is started here)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / 'tools'


def run_script(script, *args, cwd=ROOT):
    env = dict(os.environ, PYTHON=sys.executable, PORT='1')  # a torchrun would fail on port 1
    return subprocess.run(['bash', str(TOOLS / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize('script, args, usage', [
    ('dist_train.sh', ['configs/x.py'], 'CONFIG NUM_PROCESSES [train.py arguments]'),
    ('dist_train.sh', [], 'CONFIG NUM_PROCESSES [train.py arguments]'),
    ('dist_test.sh', ['configs/x.py', 'x.pth'],
     'CONFIG CHECKPOINT NUM_PROCESSES [test.py arguments]'),
])
def test_missing_arguments_print_the_usage(script, args, usage):
    proc = run_script(script, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f'usage: bash {TOOLS / script} {usage}\n'
    assert 'unbound variable' not in proc.stderr


def test_a_number_of_processes_that_is_not_one_is_refused():
    proc = run_script('dist_train.sh', 'configs/x.py', 'two')
    assert proc.returncode == 2
    assert proc.stderr == ("tools/train.py: error: NUM_PROCESSES must be a positive integer, "
                           "got 'two'\n")


def one_error_line(proc):
    """The one error line (Python's warnings of the imported packages may come before)."""
    lines = [line for line in proc.stderr.splitlines() if ': error: ' in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr + proc.stdout
    assert 'torch.distributed' not in proc.stderr + proc.stdout  # torchrun never started
    return lines[0]


def test_a_config_typo_is_one_error_line(tmp_path):
    line = one_error_line(run_script('dist_train.sh', tmp_path / 'missing.py', 2))
    assert line == f"tools/train.py: error: config file '{tmp_path / 'missing.py'}' does not exist"


@pytest.mark.slow
def test_a_config_of_no_toolbox_is_one_error_line(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text("model = dict(type='X')\n")
    line = one_error_line(run_script('dist_train.sh', cfg, 2))
    assert line.startswith('tools/train.py: error: cannot tell which toolbox runs this config')


@pytest.mark.slow
def test_a_missing_checkpoint_is_one_error_line(tmp_path):
    cfg = ROOT / 'configs' / 'mmdet' / 'faster-rcnn_orepa-r50_fpn_1x_coco.py'
    line = one_error_line(run_script('dist_test.sh', cfg, tmp_path / 'missing.pth', 2))
    assert line == f"tools/test.py: error: checkpoint '{tmp_path / 'missing.pth'}' does not exist"


def test_the_check_passes_a_good_config(tmp_path):
    from mmreparam.cli import precheck
    cfg = ROOT / 'configs' / 'mmdet' / 'faster-rcnn_orepa-r50_fpn_1x_coco.py'
    ckpt = tmp_path / 'ckpt.pth'
    ckpt.write_bytes(b'')
    assert precheck.main(['train.py', str(cfg), '--work-dir', str(tmp_path)]) == 0
    assert precheck.main(['test.py', str(cfg), str(ckpt)]) == 0
