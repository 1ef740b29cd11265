"""tools/quant_report.py: the variants' configs, the weight-spread statistic, bad counts, and
(slow) a whole run of one small variant, then a rerun that keeps its report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tool(load_tool):
    return load_tool('quant_report')


def test_variants_differ_only_in_the_backbone_and_its_optimizer(tool):
    configs = {name: tool.variant_config(name, 40, '/data/seg/') for name in tool.VARIANTS}
    for name, cfg in configs.items():
        # the same schedule and data for every variant
        assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == 40
        assert [(s.type, s.begin, s.end) for s in cfg.param_scheduler] == \
            [('LinearLR', 0, 20), ('PolyLR', 20, 40)]
        assert cfg.default_hooks.checkpoint.interval == 40
        assert cfg.randomness.seed == 0
        assert {cfg[f'{s}_dataloader'].dataset.data_root
                for s in ('train', 'val', 'test')} == {'/data/seg/'}
        assert cfg.optim_wrapper.optimizer == configs['r50-base'].optim_wrapper.optimizer
        assert cfg.model.decode_head.num_classes == 4
        assert any(h.type == 'mmreparam.FoldHook' for h in cfg.custom_hooks)
    for name, reparam in (('r50-base', 'base'), ('r50-dbb', 'DBB'), ('r50-orepa', 'OREPA'),
                          ('r50-repvgg', 'RepVGG'), ('r50-qarepvgg', 'QARepVGG')):
        backbone = configs[name].model.backbone
        assert (backbone.type, backbone.depth, backbone.base_channels, backbone.reparam) == \
            ('mmreparam.ResNet', 50, 32, reparam)
        assert configs[name].optim_wrapper.clip_grad == dict(max_norm=10)
        assert (configs[name].model.auxiliary_head.in_channels,
                configs[name].model.decode_head.in_channels) == (512, 1024)
    for name, reparam in (('repvgg-a0', 'RepVGG'), ('qarepvgg-a0', 'QARepVGG')):
        backbone = configs[name].model.backbone
        assert (backbone.type, backbone.arch, backbone.reparam) == \
            ('mmreparam.RepVGG', 'A0', reparam)
    repopt = configs['repopt-vgg-a0']
    assert (repopt.model.backbone.type, repopt.model.backbone.mode) == \
        ('mmreparam.RepOptVGG', 'target')
    assert repopt.optim_wrapper.constructor == 'mmreparam.RepOptimizerConstructor'
    for name in ('repvgg-a0', 'qarepvgg-a0', 'repopt-vgg-a0'):
        cfg = configs[name]
        assert 'clip_grad' not in cfg.optim_wrapper
        assert cfg.model.backbone.strides == (2, 2, 1, 1)
        assert cfg.model.backbone.dilations == (1, 1, 2, 4)
        # A0: stage widths 0.75 * 256 and 2.5 * 512
        assert (cfg.model.auxiliary_head.in_channels, cfg.model.decode_head.in_channels) == \
            (192, 1280)
    assert 'constructor' not in configs['repvgg-a0'].optim_wrapper


def test_cfg_options_reach_every_variant_and_the_heads_follow(tool):
    cfg = tool.variant_config('r50-dbb', 20, '/d/', {'model.backbone.base_channels': 16})
    assert cfg.model.backbone.base_channels == 16
    assert [(s.begin, s.end) for s in cfg.param_scheduler] == [(0, 10), (10, 20)]
    assert [(s.begin, s.end) for s in tool.variant_config('r50-dbb', 300, '/d/')
            .param_scheduler] == [(0, 30), (30, 300)]  # the demo's 30 warm-up iterations
    assert (cfg.model.auxiliary_head.in_channels, cfg.model.decode_head.in_channels) == \
        (256, 512)


def _deploy_checkpoint(path, weight):
    torch.save(dict(state_dict={'backbone.conv.weight': weight,
                                'backbone.conv.bias': torch.zeros(len(weight)),
                                'decode_head.conv.weight': weight * 1e3},
                    meta={}), path)


def test_weight_spread_sees_outliers(tool, tmp_path):
    torch.manual_seed(0)
    gauss = torch.randn(32, 16, 3, 3)
    _deploy_checkpoint(tmp_path / 'gauss.pth', gauss)
    spiky = gauss.clone()
    spiky[:, 0, 1, 1] = 40.0  # one huge tap per output channel (the folded identity, say)
    _deploy_checkpoint(tmp_path / 'spiky.pth', spiky)
    normal = tool.weight_spread(str(tmp_path / 'gauss.pth'))
    assert 2.5 < normal < 4.5  # the max of 144 Gaussian samples, in standard deviations
    assert tool.weight_spread(str(tmp_path / 'spiky.pth')) > 10


@pytest.mark.parametrize('argv, message', [
    (['--calib', '40', '--eval', '16', '--num-val', '48'], 'need --num-val >= 56'),
    (['--iters', '3'], '--iters must be at least 10'),
    (['--eval', '0'], '--eval must be at least 1'),
])
def test_bad_counts_are_one_error(tool, argv, message, tmp_path, capsys):
    assert tool.main(['--work-dir', str(tmp_path / 'w'), *argv]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('tools/quant_report.py: error: ')
    assert message in lines[0]
    assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_one_small_variant_end_to_end_then_kept(tmp_path):
    work = tmp_path / 'report'
    cmd = [sys.executable, str(REPO / 'tools' / 'quant_report.py'), '--work-dir', str(work),
           '--variants', 'r50-base', '--iters', '10', '--num-val', '4', '--calib', '2',
           '--eval', '2', '--cfg-options', 'model.backbone.depth=18',
           'model.backbone.base_channels=8', 'model.decode_head.channels=8',
           'model.auxiliary_head.channels=8']
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rows = json.loads((work / 'quant_report.json').read_text())['rows']
    assert [r['variant'] for r in rows] == ['r50-base']
    row = rows[0]
    assert 0 <= row['float'] <= 100 and 0 <= row['int8'] <= 100
    assert 0.5 < row['cosine_min'] <= 1.0 and row['fold_error'] < 1e-4
    assert row['int8_mib'] < row['size_mib'] / 2.5
    table = (work / 'quant_report.md').read_text()
    assert '| r50-base |' in table
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'r50-base: kept' in second.stdout
    assert json.loads((work / 'quant_report.json').read_text())['rows'] == rows
