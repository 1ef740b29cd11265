"""tools/convert.py: an official OREPA ResNet-50 into a deploy checkpoint that loads and
computes the official network; bad input is one error line and writes nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import image, max_rel_error, pretrained, run
from official_checkpoints import R50, reference_resnet

from mmreparam.models import ResNet

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures('single_thread')


def convert_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(REPO / 'tools' / 'convert.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_convert_tool(orepa_r50, tmp_path):
    dst = tmp_path / 'r50_deploy.pth'
    result = convert_tool(orepa_r50['train'], dst, '--arch', 'ResNet-50', '--deploy', '--set',
                          'base_channels=8', 'stem_channels=64')
    assert result.returncode == 0, result.stderr
    assert 'official OREPA ResNet' in result.stdout
    saved = torch.load(dst)
    assert saved['meta']['backbone']['reparam'] == 'OREPA'
    assert set(saved['state_dict']) == set(ResNet(reparam='OREPA', deploy=True,
                                                  **R50).state_dict())
    assert not (tmp_path / 'r50_deploy.pth.tmp').exists()
    model = pretrained(ResNet, dst, reparam='OREPA', deploy=True, **R50)
    x = image()
    outputs, reference = run(model, x), reference_resnet(x, orepa_r50['convs'], 50)
    assert max_rel_error(outputs, reference) < 1e-5  # the tool saves float32

    result = convert_tool(tmp_path / 'missing.pth', dst, '--arch', 'ResNet-50')
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        f"error: checkpoint '{tmp_path / 'missing.pth'}' does not exist"]


def test_convert_tool_refuses_bad_input(orepa_r50, tmp_path, capsys, load_tool):
    tool = load_tool('convert')
    dst = tmp_path / 'out.pth'
    for args, message in (
        (['--arch', 'ResNet-18', '--set', 'base_channels=8', 'stem_channels=32'],
         'does not fit ResNet'),
        (['--arch', 'VGG-16'], "unknown --arch 'VGG-16'"),
        (['--arch', 'ResNet-50', '--reparam', 'XYZ'], "unknown reparam 'XYZ'"),
    ):
        assert tool.main([str(orepa_r50['train']), str(dst), *args]) == 1
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith('error:') and message in errors[0]
        assert not dst.exists()
