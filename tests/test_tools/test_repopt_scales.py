"""tools/repopt_scales.py: constant scales, extraction from HS checkpoints, bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmreparam.engine.optimizers import load_scales
from mmreparam.models.backbones import RepOptVGG
from mmreparam.models.backbones.repopt_scales import constant_scales

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tool(load_tool):
    return load_tool('repopt_scales')


def same(a, b):
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n])
        for n in a)


def test_const_writes_the_hs_initial_scales(tool, tmp_path, capsys):
    out = tmp_path / 'b1.pth'
    assert tool.main(['const', 'RepOpt-VGG-B1', str(out)]) == 0
    assert '28 blocks (23 with identity)' in capsys.readouterr().out
    with torch.device('meta'):
        expected = constant_scales(RepOptVGG('B1'))
    assert same(load_scales(out), expected)
    assert torch.load(out, weights_only=True)['meta']['arch'] == 'B1'


def test_extract_from_hs_checkpoint_and_check_arch(tool, tmp_path, capsys):
    hs = RepOptVGG('A0', base_channels=8, mode='hs')
    with torch.no_grad():
        for name, param in hs.named_parameters():
            if 'scale' in name:
                param.uniform_(0.5, 1.5)
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in hs.state_dict().items()},
                'meta': {'epoch': 240}}, tmp_path / 'hs.pth')
    out = tmp_path / 'scales.pth'
    assert tool.main(['extract', str(tmp_path / 'hs.pth'), str(out), '--arch', 'A0',
                      '--set', 'base_channels=8']) == 0
    assert same(load_scales(out), hs.get_scales())
    capsys.readouterr()
    # The same scales checked against B1 do not fit: one error line, nothing written.
    bad = tmp_path / 'bad.pth'
    assert tool.main(['extract', str(tmp_path / 'hs.pth'), str(bad), '--arch', 'B1']) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith('error: ') and 'do not fit' in errors[0]
    assert not bad.exists()


@pytest.mark.parametrize('args,message', [
    (['const', 'Z9', '{out}'], "unknown RepOptVGG arch 'Z9'"),
    (['extract', '{tmp}/missing.pth', '{out}'], 'missing.pth'),
    (['extract', '{tmp}/junk.pth', '{out}'], 'cannot read'),
    (['const', 'B1', '{out}', '--set', 'base_channels'], '--set expects KEY=VALUE'),
])
def test_bad_input_exits_non_zero(tool, tmp_path, capsys, args, message):
    (tmp_path / 'junk.pth').write_bytes(b'\x00junk')
    out = tmp_path / 'out.pth'
    args = [a.format(tmp=tmp_path, out=out) for a in args]
    assert tool.main(args) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith('error: ') and message in errors[0]
    assert not out.exists()


def test_script_exit_status(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'repopt_scales.py'),
                             'extract', str(tmp_path / 'none.pth'), str(tmp_path / 'o.pth')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('error: checkpoint')
