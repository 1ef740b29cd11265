"""tools/reparam_table.py: one row measured and written; bad names and sizes refused."""
import pytest


def test_unknown_backbone_is_refused(load_tool, capsys):
    tool = load_tool('reparam_table')
    with pytest.raises(SystemExit) as exc:
        tool.main(['--backbones', 'nope'])
    assert exc.value.code == 2
    assert "unknown backbone(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--reparams', 'nope'], "argument --reparams: invalid choice: 'nope'"),
    (['--steps', '0'], '--steps must be a positive int, got 0'),
    (['--size', '-64'], '--size must be a positive int, got -64'),
])
def test_bad_arguments_are_refused_before_any_row(load_tool, capsys, tmp_path, args, message):
    tool = load_tool('reparam_table')
    out = tmp_path / 'table.md'
    with pytest.raises(SystemExit) as exc:
        tool.main([*args, '--out', str(out)])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == '' and not out.exists()  # no header, no row, no file


def test_measure_refuses_zero_steps():
    from mmreparam.benchmark.reparam_table import BACKBONES, measure
    with pytest.raises(ValueError, match='size and steps must be positive, got size=64, steps=0'):
        measure(BACKBONES['mmdet ResNet-50'], 'ACB', 64, 0)


@pytest.mark.slow
def test_one_row(load_tool, tmp_path):
    tool = load_tool('reparam_table')
    out = tmp_path / 'table.md'
    assert tool.main(['--backbones', 'mmseg Fast-SCNN', '--reparams', 'DBB', '--size', '64',
                      '--steps', '1', '--out', str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith('| mmseg')]
    assert len(rows) == 1 and 'failed' not in rows[0]
    cells = [cell.strip() for cell in rows[0].split('|')[1:-1]]
    converted, eligible = map(int, cells[2].split(' of ')[0].split('/'))
    assert eligible > 0 and converted >= 0.9 * eligible
    assert all(float(cells[i]) <= 1e-5 for i in (3, 4, 7))  # expansion, fold, load
    assert float(cells[5]) <= 1e-10  # fold in float64
    assert 0 < float(cells[6]) <= 1e-5  # the float32 model's own rounding error
    with_grad, trainable = map(int, cells[8].split('/'))
    assert trainable > 0 and with_grad == trainable
