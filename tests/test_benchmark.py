"""mmreparam.benchmark: the tables' Markdown, the page, and block types from the registry."""
import subprocess
import sys
from pathlib import Path

import pytest

from mmreparam.benchmark import SECTIONS, BenchmarkSettings, Report, Table, benchmark_markdown
from mmreparam.models.layers.factory import REPARAM_TYPES

ROOT = Path(__file__).resolve().parents[1]


def test_table_markdown_with_intro_and_notes():
    table = Table('Title', ['a', 'b'], intro='Before.', notes=['After.'])
    table.add('x', 1.5)
    assert table.lines() == ['## Title', '', 'Before.', '', '| a | b |', '|---|---|',
                             '| x | 1.5 |', '', 'After.', '']
    with pytest.raises(ValueError, match='a row of 1 cells for 2 columns'):
        table.add('only one')


def test_page_has_the_heading_the_command_and_every_table_in_order():
    first, second = Table('One', ['a']), Table('Two', ['b'])
    first.add(1)
    reports = dict(fold=Report([first]), launches=Report([]), det=Report([second]))
    text = benchmark_markdown(reports, BenchmarkSettings(repeats=3), 90,
                              'python tools/benchmark.py --only fold det')
    lines = text.splitlines()
    assert lines[0] == '# mmreparam benchmark'
    assert lines[2].startswith('Measured ') and lines[2].endswith(
        'median of 3 runs (min-max), in 1.5 min with '
        '`python tools/benchmark.py --only fold det`.')
    assert [line for line in lines if line.startswith('## ')] == ['## One', '## Two']


def test_block_types_come_from_the_registry():
    settings = BenchmarkSettings()
    assert settings.reparams == list(REPARAM_TYPES)
    assert BenchmarkSettings(reparams=['DBB']).reparams == ['base', 'DBB']  # ratios to base
    with pytest.raises(ValueError, match="unknown reparam \\['nope'\\]"):
        BenchmarkSettings(reparams=['nope'])
    assert list(SECTIONS) == ['train', 'ops', 'launches', 'kernel', 'block', 'infer', 'fold',
                              'det']


@pytest.mark.parametrize('kwargs, message', [
    (dict(repeats=0), 'repeats must be an int of at least 1, got 0'),
    (dict(rounds=-1), 'rounds must be an int of at least 1, got -1'),
    (dict(warmup=1.5), 'warmup must be an int of at least 0, got 1.5'),
    (dict(repeats=True), 'repeats must be an int of at least 1, got True'),
    (dict(infer_shape=(8, 0)), r'infer_shape must be two positive ints \(batch, size\), got '
     r'\(8, 0\)'),
    (dict(infer_shape=(8, )), r'infer_shape must be two positive ints'),
    (dict(amp='fp16'), "amp must be None or 'bf16', got 'fp16'"),
])
def test_bad_settings_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkSettings(**kwargs)


def test_the_tool_reports_a_bad_setting_as_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--only', 'fold',
                           '--repeats', '0', '--out', str(tmp_path / 'out')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ('tools/benchmark.py: error: repeats must be an int of at least 1, '
                           'got 0\n')
    assert not (tmp_path / 'out').exists()  # nothing measured, nothing written


def test_launches_reports_nothing_without_cuda():
    assert SECTIONS['launches'](BenchmarkSettings(device='cpu')).tables == []


def test_train_step_child_process_returns_its_measurement():
    """The training-step measurement runs in a fresh process and hands its result back
    through a file (not stdout)."""
    from mmreparam.benchmark.cost import _train_step_in_subprocess
    stats = _train_step_in_subprocess(reparam='base', batch=2, size=64, repeats=1, warmup=0,
                                      device='cpu')
    assert len(stats['times']) == 1 and stats['times'][0] > 0
    assert stats['params'] > 20e6 and stats['peak_memory'] > 0
