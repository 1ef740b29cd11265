"""tools/reparam_table.py: one row measured and written; bad names refused."""
import pytest


def test_unknown_backbone_is_refused(load_tool, capsys):
    tool = load_tool('reparam_table')
    with pytest.raises(SystemExit) as exc:
        tool.main(['--backbones', 'nope'])
    assert exc.value.code == 2
    assert "unknown backbone(s) ['nope']" in capsys.readouterr().err


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
