"""type='mmreparam.Reparameterized' in an mmdet config: built through mmdet's registry
(no custom_imports), upstream checkpoints load and expand exactly, and the fold gives the
model that upstream_config() builds."""
import copy
import importlib
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint

import mmreparam
from mmreparam.models.layers import ReparamBlock
from mmreparam.testing import randomize_bn, randomize_parameters

pytest.importorskip('mmdet')


def rtmdet_cfg(reparam='OREPA'):
    """RTMDet-tiny from mmdet's own config at 1/3 of its width, backbone and neck wrapped."""
    import mmdet
    path = Path(mmdet.__file__).parent / '.mim/configs/rtmdet/rtmdet_tiny_8xb32-300e_coco.py'
    cfg = Config.fromfile(path).model
    backbone = dict(cfg.backbone, widen_factor=0.125, init_cfg=None)
    neck = dict(cfg.neck, in_channels=[32, 64, 128], out_channels=16, num_csp_blocks=1)
    cfg.backbone = dict(type='mmreparam.Reparameterized', reparam=reparam, module=backbone)
    cfg.neck = dict(type='mmreparam.Reparameterized', reparam=reparam, module=neck)
    cfg.bbox_head.update(in_channels=16, feat_channels=16, num_classes=2)
    return cfg


def build(cfg):
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(copy.deepcopy(cfg))


def feats(model, x):
    model.eval()
    with torch.no_grad():
        return model.extract_feat(x)


def max_rel(a, b):
    return max(((p.double() - q.double()).abs().max() / p.double().abs().max()).item()
               for p, q in zip(a, b))


def test_mmdet_config_builds_and_loads_upstream_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = rtmdet_cfg()
    model = build(cfg)
    assert type(model.backbone).__name__ == 'CSPNeXt'  # the upstream module, no wrapper
    assert type(model.neck).__name__ == 'CSPNeXtPAFPN'
    for part in (model.backbone, model.neck):
        report = part.reparam_report
        assert report.converted and len(report.converted) >= 0.9 * report.eligible
    # A whole upstream detector checkpoint (load_from) loads strictly and expands exactly.
    upstream = randomize_bn(build(mmreparam.upstream_config(cfg)), seed=1)
    assert 'mmreparam' not in str(mmreparam.upstream_config(cfg))
    path = tmp_path / 'upstream.pth'
    torch.save({'state_dict': upstream.state_dict()}, path)
    load_checkpoint(model, str(path), map_location='cpu', strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert max_rel(feats(upstream, x), feats(model, x)) <= 1e-5
    # Keys outside the replaced pairs are the upstream ones, with no extra level.
    pair_paths = {f'{name}.{path}' for name in ('backbone', 'neck')
                  for report in [getattr(model, name).reparam_report]
                  for conv, norm, _ in report.converted for path in (conv, norm)}
    plain_keys = {k for k in upstream.state_dict()
                  if not any(k.startswith(p + '.') for p in pair_paths)}
    assert plain_keys <= set(model.state_dict())

    # Trained (every branch on), folded: the upstream config builds a model that loads it.
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=2)
    randomize_bn(model, seed=3)
    folded = mmreparam.fold(model)
    fresh = build(mmreparam.upstream_config(cfg))
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel(feats(model, x), feats(fresh, x)) <= 1e-5


def test_pretrained_init_cfg_expands_on_init_weights(tmp_path):
    torch.manual_seed(0)
    backbone = dict(type='mmdet.ResNet', depth=18, base_channels=8, norm_eval=False)
    upstream = randomize_bn(build(backbone), seed=4)
    path = tmp_path / 'r18.pth'
    torch.save({'state_dict': upstream.state_dict()}, path)
    cfg = dict(type='mmreparam.Reparameterized', reparam=dict(type='DBB'),
               module=dict(backbone, init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    model = build(cfg)
    blocks = [m for m in model.modules() if isinstance(m, ReparamBlock)]
    assert blocks  # parameters exist at build time (before init_weights)
    model.init_weights()
    x = torch.randn(1, 3, 64, 64)
    upstream.eval()
    model.eval()
    with torch.no_grad():
        assert max_rel(upstream(x), model(x)) <= 1e-5


def test_registered_without_custom_imports():
    from mmdet.registry import MODELS

    from mmreparam.apis.reparameterize import build_reparameterized
    assert MODELS.get('mmreparam.Reparameterized') is build_reparameterized
    with pytest.raises(ValueError, match='module=dict'):
        build(dict(type='mmreparam.Reparameterized', reparam='OREPA', module=None))
    with pytest.raises(ValueError, match='choose one of'):
        build(dict(type='mmreparam.Reparameterized', reparam='nope',
                   module=dict(type='ResNet', depth=18)))


@pytest.mark.parametrize('scope, module', [
    ('mmseg', dict(type='BiSeNetV2', detail_channels=(8, 8, 32), semantic_channels=(8, 8, 16, 32),
                   semantic_expansion_ratio=2, bga_channels=32, out_indices=(0, 1, 2, 3, 4))),
    ('mmpretrain', dict(type='MobileNetV2', widen_factor=0.25)),
])
def test_mmseg_and_mmpretrain_registries(scope, module):
    pytest.importorskip(scope)
    from mmengine.registry import init_default_scope
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(dict(type='mmreparam.Reparameterized', reparam='ACB',
                                    module=module))
    assert type(model).__name__ == module['type']
    assert model.reparam_report.converted
    assert any(isinstance(m, ReparamBlock) for m in model.modules())


@pytest.mark.parametrize('deploy_form', ['upstream', 'mmreparam'])
def test_deploy_pair_of_a_wrapped_detector_is_the_upstream_one(tmp_path, deploy_form):
    """Both deploy forms of a model whose only re-param parts are wrappers are the upstream
    model (the wrapper's fold is its upstream module): no mmreparam name in the config, and
    the checkpoint loads strictly with the folded model's outputs."""
    from mmreparam.apis.deploy import export_deploy
    torch.manual_seed(0)
    cfg = rtmdet_cfg('DBB')
    model = randomize_bn(build(cfg), seed=5)
    folded = mmreparam.fold(model)
    paths = export_deploy(folded, Config(dict(model=cfg, default_scope='mmdet')), str(tmp_path),
                          deploy_form=deploy_form)
    text = Path(paths['config']).read_text()
    assert 'mmreparam' not in text
    deployed = build(Config.fromfile(paths['config']).model)
    load_checkpoint(deployed, paths['checkpoint'], map_location='cpu', strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert max_rel(feats(model, x), feats(deployed, x)) <= 1e-5
