"""Every config in configs/ loads, builds its model and runs one forward at a small size."""
import copy
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmreparam.apis.deploy import deploy_config, models_registry

CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / 'configs').rglob('*.py')
    if '_base_' not in p.parts and not p.name.startswith('synthetic_'))


def test_there_are_configs_for_every_toolbox():
    names = {p.parent.name for p in CONFIGS}
    assert {'mmdet', 'mmseg', 'mmpretrain', 'demo'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_config_builds_and_runs(path):
    cfg = Config.fromfile(str(path))
    scope = cfg.default_scope
    assert cfg.model.backbone.type.startswith('mmreparam.')
    assert any(h['type'] == 'mmreparam.FoldHook' for h in cfg.custom_hooks)
    init_default_scope(scope)
    model = models_registry(scope).build(cfg.model).eval()
    # Backbones built for one input size (RepMLPResNet's global perceptron) run at it.
    size = cfg.model.backbone.get('img_size', 64)
    if scope == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        data = demo_mm_inputs(1, image_shapes=(3, 128, 128), with_mask=True)
    elif scope == 'mmseg':
        data = dict(inputs=[torch.randint(0, 255, (3, size, size), dtype=torch.uint8)])
    else:
        data = dict(inputs=[torch.randint(0, 255, (3, size, size), dtype=torch.uint8)])
    batch = model.data_preprocessor(data, False)
    with torch.no_grad():
        out = model(batch['inputs'], batch.get('data_samples'), mode='tensor')
    assert out is not None
    # The deploy config of each builds the folded structure.
    dcfg = deploy_config(cfg)
    if cfg.model.backbone.type == 'mmreparam.Reparameterized':
        # A wrapped upstream module folds back into that module: its config, no Pretrained.
        for part in ('backbone', 'neck'):
            wrapped = cfg.model.get(part)
            if wrapped and wrapped.type == 'mmreparam.Reparameterized':
                assert dcfg.model[part].type == wrapped.module.type
                assert 'Pretrained' not in str(dcfg.model[part].get('init_cfg'))
        assert 'mmreparam' not in str(dcfg.model)
    else:
        assert dcfg.model.backbone.deploy is True


def test_rtmdet_orepa_config_expands_the_imagenet_cspnext_checkpoint(tmp_path):
    """configs/mmdet/rtmdet_orepa-tiny keeps mmdet's Pretrained init (prefix='backbone.') of
    its CSPNeXt: a checkpoint laid out as the released ImageNet classifier loads into the
    upstream keys and expands into the OREPA blocks, computing the plain backbone exactly."""
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / 'configs' / 'mmdet'
                              / 'rtmdet_orepa-tiny_8xb32-300e_coco.py'))
    init_cfg = cfg.model.backbone.module.init_cfg
    assert init_cfg.type == 'Pretrained' and init_cfg.prefix == 'backbone.'
    assert init_cfg.checkpoint.endswith('cspnext-tiny_imagenet_600e.pth')
    init_default_scope('mmdet')
    registry = models_registry('mmdet')
    plain = registry.build(dict(cfg.model.backbone.module, init_cfg=None))
    plain.eval()  # CSPNeXt.train() returns None
    torch.manual_seed(0)
    for m in plain.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    state = {f'backbone.{k}': v for k, v in plain.state_dict().items()}
    state.update({'head.fc.weight': torch.randn(1000, 384), 'head.fc.bias': torch.zeros(1000)})
    path = tmp_path / 'cspnext-tiny_imagenet_600e.pth'
    torch.save({'state_dict': state}, path)
    backbone_cfg = copy.deepcopy(cfg.model.backbone)
    backbone_cfg.module.init_cfg.checkpoint = str(path)
    backbone = registry.build(backbone_cfg)
    report = backbone.reparam_report
    assert len(report.converted) == report.eligible == 33 and not report.left_plain
    backbone.init_weights()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        backbone.eval()
        for a, b in zip(plain(x), backbone(x)):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
