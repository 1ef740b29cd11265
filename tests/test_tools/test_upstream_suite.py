""".dev_scripts/upstream_suite.py: upstream names replaced by ours, per-test and per-section
results, the JSON report, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A small upstream-style test file: mmdet imports, a relative helper, "# Test" sections.
FAKE_TEST = '''\
import pytest
from mmdet.models.backbones import ResNet
from mmdet.models.backbones.resnet import Bottleneck
from mmdet.models.layers import ResLayer
from .utils import is_block


def test_built_with_ours():
    # Test the model is mmreparam's, with its units seen by the helper
    model = ResNet(50, base_channels=8)
    assert hasattr(model, 'stem') and model.reparam == 'base'
    assert any(is_block(m) for m in model.modules())

    # Test a failing section does not stop the next one
    assert model.conv1 is None

    # Test later sections see what earlier ones assigned
    assert sum(isinstance(m, Bottleneck) for m in model.modules()) == 16


def test_res_layer():
    layer = ResLayer(Bottleneck, 64, 16, 3)
    assert len(layer) == 3
'''
FAKE_UTILS = '''\
from mmdet.models.backbones.resnet import Bottleneck


def is_block(module):
    return isinstance(module, Bottleneck)
'''


def run_tool(*args):
    script = REPO / '.dev_scripts' / 'upstream_suite.py'
    return subprocess.run([sys.executable, str(script), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.fixture
def upstream(tmp_path):
    folder = tmp_path / 'mmdet-x'
    folder.mkdir()
    (folder / 'test_fake.py').write_text(FAKE_TEST)
    (folder / 'utils.py').write_text(FAKE_UTILS)
    return folder / 'test_fake.py'


def line_of(text, source):
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def test_sections_with_our_classes(upstream, tmp_path):
    out = tmp_path / 'report.json'
    result = run_tool(str(upstream), '--sections', '--json', str(out))
    assert result.returncode == 1, result.stderr  # not every section passed
    report = json.loads(out.read_text())
    assert report['mode'] == 'sections' and report['substituted'] is True
    assert report['replaced']['utils'] == {
        'Bottleneck': "mmreparam.models.backbones.resnet.Bottleneck({'reparam': 'base'})"}
    assert report['replaced']['test_fake']['ResLayer'].startswith('missing: ')
    outcomes = [(t['id'], t['outcome']) for t in report['tests']]
    first, second, third, layer = (line_of(text, FAKE_TEST) for text in (
        'model = ResNet', 'model.conv1', 'sum(isinstance', 'layer = ResLayer'))
    assert outcomes == [(f'test_built_with_ours[L{first}-{first + 2}]', 'passed'),
                        (f'test_built_with_ours[L{second}-{second}]', 'failed'),
                        (f'test_built_with_ours[L{third}-{third}]', 'passed'),
                        (f'test_res_layer[L{layer}-{layer + 1}]', 'failed')]
    failed = report['tests'][1]
    assert failed['line'] == second and failed['error'].startswith('AttributeError')
    assert 'no attribute' in failed['error'] and "'conv1'" in failed['error']
    assert report['tests'][0]['title'].startswith('Test the model is')
    assert 'NotImplementedError: ResLayer' in report['tests'][3]['error']
    assert report['summary'] == dict(total=4, passed=2, failed=2)
    assert report['functions'] == dict(total=2, passed=0)
    assert report['versions']['mmdet'] and report['versions']['mmreparam']
    assert f'test_built_with_ours[L{second}-{second}]' in result.stdout  # the table


def test_functions_stop_at_the_first_difference_and_pytest_args_pass_through(upstream,
                                                                            tmp_path):
    out = tmp_path / 'report.json'
    result = run_tool(str(upstream), '--json', str(out), '--', '-k', 'built')
    assert result.returncode == 1, result.stderr
    report = json.loads(out.read_text())
    assert [(t['id'], t['outcome'], t['line']) for t in report['tests']] == [
        ('test_built_with_ours', 'failed', line_of('model.conv1', FAKE_TEST))]


def test_bad_input_is_one_message(upstream, tmp_path):
    (upstream.parent / 'utils.py').unlink()
    result = run_tool(str(upstream))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'.dev_scripts/upstream_suite.py: error: {upstream} imports .utils, but '
        f'{upstream.parent / "utils.py"} is not there: put the upstream helper module next '
        'to the test file']
    result = run_tool(str(tmp_path / 'nothing.py'))
    assert result.returncode == 1 and 'no test file' in result.stderr


def test_upstream_baseline_keeps_their_classes(upstream, tmp_path):
    out = tmp_path / 'report.json'
    result = run_tool(str(upstream), '--upstream', '--json', str(out))
    assert result.returncode == 1, result.stderr
    report = json.loads(out.read_text())
    assert report['substituted'] is False and report['replaced'] == {'test_fake': {},
                                                                    'utils': {}}
    assert [(t['id'], t['outcome']) for t in report['tests']] == [
        ('test_built_with_ours', 'failed'), ('test_res_layer', 'passed')]  # mmdet's own
    assert report['tests'][0]['line'] == line_of("hasattr(model, 'stem')", FAKE_TEST)
