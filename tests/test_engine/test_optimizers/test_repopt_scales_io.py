"""RepOptimizer scales files (mmreparam.engine.optimizers.repopt_scales_io): the round trip,
hyper-search checkpoints (mmreparam's and the official layout) read by ``RepOptVGG(scales=)``,
and bad files named in the error."""
import subprocess
import sys
import textwrap

import pytest
import torch

from mmreparam.engine.optimizers import load_scales, save_scales
from mmreparam.models.backbones import RepOptVGG
from mmreparam.models.backbones.repopt_scales import SCALES_LOADERS, ScalesError, constant_scales
from mmreparam.testing import official_repopt_keys

TINY = dict(num_blocks=[1, 2, 2, 1], width_factor=[0.125, 0.125, 0.125, 0.125])


def test_scales_round_trip_and_hs_checkpoints(tmp_path):
    hs = RepOptVGG(TINY, mode='hs')
    with torch.no_grad():  # a "trained" HS model
        for p in hs.parameters():
            p.add_(torch.rand_like(p))
    scales = hs.get_scales()
    path = tmp_path / 'scales.pth'
    save_scales(scales, path, meta=dict(arch='tiny'))
    assert torch.load(path, weights_only=True)['meta']['format'] == 'mmreparam.repopt_scales'
    loaded = load_scales(path)
    assert loaded.keys() == scales.keys() and all(
        torch.equal(loaded[n][k], scales[n][k]) for n in scales for k in scales[n])
    # An mmreparam HS checkpoint (classifier with backbone.) and the official layout.
    ckpt = {'state_dict': {f'backbone.{k}': v for k, v in hs.state_dict().items()}}
    torch.save(ckpt, tmp_path / 'hs.pth')
    torch.save({'model': official_repopt_keys(hs.state_dict())}, tmp_path / 'official.pth')
    for source in (tmp_path / 'hs.pth', tmp_path / 'official.pth'):
        target = RepOptVGG(TINY, scales=str(source))
        got = target.get_scales()
        assert all(torch.equal(got[n][k], scales[n][k]) for n in scales for k in scales[n])


def test_bad_scales_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_scales(tmp_path / 'missing.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ScalesError, match='cannot read .*junk.pth'):
        load_scales(tmp_path / 'junk.pth')
    torch.save({'state_dict': {'conv.weight': torch.zeros(1)}}, tmp_path / 'plain.pth')
    neither = r'plain.pth.* is neither a scales file .* nor a hyper-search checkpoint'
    with pytest.raises(ScalesError, match=neither):
        load_scales(tmp_path / 'plain.pth')
    torch.save({'scales': {'stem': {'conv': torch.ones(4)}}}, tmp_path / 'partial.pth')
    with pytest.raises(ScalesError, match="block 'stem' has keys"):
        load_scales(tmp_path / 'partial.pth')
    # Scales of another arch: the message names the blocks and channels that do not fit.
    with torch.device('meta'):
        other = RepOptVGG(dict(TINY, num_blocks=[1, 2, 3, 1]))
    save_scales(constant_scales(other), tmp_path / 'other.pth')
    model = RepOptVGG(TINY, scales=str(tmp_path / 'other.pth'))
    with pytest.raises(ScalesError, match='stage_3.2, which the model does not have'):
        model.get_scales()
    wide = constant_scales(RepOptVGG(dict(TINY, width_factor=[0.25] * 4)))
    with pytest.raises(ScalesError, match="stem: 'conv' has 16 channels, the block has 8"):
        RepOptVGG(TINY, scales=wide).repopt_grad_mults()


def test_the_models_layer_reads_files_through_the_registered_loader():
    assert SCALES_LOADERS.get('load_scales') is load_scales


def test_backbone_reads_a_scales_file_in_a_fresh_interpreter(tmp_path):
    """Importing only the backbone is enough for ``RepOptVGG(scales=PATH)`` to read it."""
    save_scales(constant_scales(RepOptVGG(TINY)), tmp_path / 's.pth')
    code = textwrap.dedent(f'''
        from mmreparam.models.backbones.repoptvgg import RepOptVGG
        model = RepOptVGG({TINY!r}, scales={str(tmp_path / 's.pth')!r})
        print(len(model.get_scales()))
    ''')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == '7'
