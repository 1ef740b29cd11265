"""mmreparam.RepOptVGG: arches, modes and their classes, init from scales, fold / deploy,
official checkpoints, and inside an mmpretrain classifier and an mmdet detector built from the
repopt configs."""
import ast
import copy
import pickle
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from test_in_toolboxes import build, check_train_step_and_fold
from torch.nn.modules.batchnorm import _BatchNorm

import mmreparam
from mmreparam.apis.deploy import deploy_config
from mmreparam.engine import RepOptSGD
from mmreparam.models.backbones import RepOptVGG
from mmreparam.models.backbones.repopt_blocks import CSLABlock
from mmreparam.models.backbones.repopt_scales import constant_scales
from mmreparam.models.backbones.repoptvgg import CSLARepOptVGG, HSRepOptVGG, TargetRepOptVGG
from mmreparam.models.layers import ConvBN
from mmreparam.models.layers.fuse import identity_kernel
from mmreparam.testing import official_repopt_keys, randomize_bn

ROOT = Path(__file__).resolve().parents[3]
TINY = dict(num_blocks=[1, 2, 2, 1], width_factor=[0.125] * 4)
ALL = (0, 1, 2, 3)


@pytest.mark.parametrize('arch,channels', [('B1', [16, 32, 64, 256]),
                                           ('L2', [20, 40, 80, 320]),
                                           ('B1g2', [16, 32, 64, 256])])
def test_arches_build_and_run(arch, channels):
    model = RepOptVGG(arch, base_channels=8, out_indices=ALL).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == channels
    blocks = model.repopt_blocks()
    assert len(blocks) == 1 + sum(RepOptVGG.arch_settings[arch]['num_blocks'])
    assert all(type(b) is ConvBN for b in blocks.values())  # the official RealVGGBlock
    assert RepOptVGG.arch_settings['B1'] is RepOptVGG.__mro__[1].arch_settings['B1']


def test_modes_and_bad_arguments():
    hs = RepOptVGG(TINY, mode='hs')
    csla = RepOptVGG(TINY, mode='csla')
    assert all(type(b) is CSLABlock for b in hs.repopt_blocks().values())
    trainable = {n for n, p in csla.named_parameters() if 'scale' in n}
    assert trainable and all('scale_identity' in n for n in trainable)  # s, t are constants
    assert any('scale_conv' in n for n, _ in hs.named_parameters())
    # HS initial values: 1 for the stem and first blocks, sqrt(2 / l) after (paper App. B.1).
    scales = hs.get_scales()
    assert torch.allclose(scales['stage_3.1']['conv'], torch.full((32, ), 2 ** 0.5))
    assert torch.equal(scales['stage_3.0']['conv_1x1'], torch.ones(32))
    assert 'identity' in scales['stage_3.1'] and 'identity' not in scales['stage_3.0']
    for kwargs, error, match in (
            (dict(arch='D2se'), ValueError, 'unknown RepOptVGG arch'),
            (dict(arch=dict(TINY, use_se=True)), ValueError, 'no SE'),
            (dict(arch=dict(TINY, se_cfg=dict(ratio=4))), ValueError, 'no SE'),
            (dict(arch=TINY, mode='repvgg'), ValueError, 'unknown RepOptVGG mode'),
            (dict(arch=TINY, scales=3), TypeError, 'scales'),
            (dict(arch=TINY, mode='hs', init_cfg=dict(type='Pretrained', checkpoint='x')),
             ValueError, "mode='target' only")):
        with pytest.raises(error, match=match):
            RepOptVGG(**kwargs)


def test_each_mode_is_its_own_class():
    """``RepOptVGG(mode=...)`` builds the form's class: only the methods that form has."""
    forms = {'target': TargetRepOptVGG, 'hs': HSRepOptVGG, 'csla': CSLARepOptVGG}
    for mode, form in forms.items():
        model = RepOptVGG(TINY, mode=mode)
        assert type(model) is form and isinstance(model, RepOptVGG) and model.mode == mode
        built = mmreparam.MODELS.build(dict(type='mmreparam.RepOptVGG', arch=TINY, mode=mode))
        assert type(built) is form
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(copied) is form
        assert type(form(TINY)) is form and form(TINY, mode=mode).mode == mode
    target, hs = RepOptVGG(TINY), RepOptVGG(TINY, mode='hs')
    assert target.reparam == 'base' and hs.reparam == 'CSLA'  # block forms, not modes
    assert not hasattr(target, 'target_state_dict')
    assert not hasattr(hs, 'repopt_grad_mults') and not hasattr(hs, 'use_scales')
    with pytest.raises(ValueError, match="'target' form of RepOptVGG, not 'hs'"):
        TargetRepOptVGG(TINY, mode='hs')


def test_grad_mults_are_a_query_and_use_scales_binds_once():
    model = RepOptVGG(TINY)
    pairs = model.repopt_grad_mults()
    assert len(pairs) == 7 and model.scales is None  # asking changes nothing
    scales = {n: {k: v * 2 for k, v in e.items()} for n, e in constant_scales(model).items()}
    model.use_scales(scales)
    assert model.scales is scales
    assert torch.equal(model.get_scales()['stem']['conv'], scales['stem']['conv'])
    model.use_scales(scales)  # the same again: fine
    with pytest.raises(ValueError, match='holds other scales'):
        model.use_scales('const')


def test_repopt_modules_import_nothing_above_the_models_layer():
    root = Path(mmreparam.__file__).parent / 'models' / 'backbones'
    for name in ('repoptvgg.py', 'repopt_blocks.py', 'repopt_scales.py'):
        tree = ast.parse((root / name).read_text())
        imported = [node.module or '' for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                     for alias in node.names]
        upward = [m for m in imported if m.lstrip('.').split('.')[0] in
                  ('checkpoint', 'apis', 'engine') or m.startswith('mmreparam.')
                  and m.split('.')[1] in ('checkpoint', 'apis', 'engine')]
        assert not upward, (name, upward)


def test_moved_names_stay_importable_at_their_old_places():
    from mmreparam import errors
    from mmreparam.models.backbones import repopt_blocks, repopt_scales
    from mmreparam.models.layers import csla
    assert repopt_blocks.CSLABlock is csla.CSLABlock is mmreparam.models.layers.CSLABlock
    assert repopt_blocks.repopt_grad_mult is csla.repopt_grad_mult
    assert repopt_scales.ScalesError is errors.ScalesError
    assert issubclass(errors.ScalesError, (errors.CheckpointError, ValueError))
    assert issubclass(errors.ScalesError, ValueError)


def test_init_from_scales_is_the_rule_of_initialization():
    """``W <- s * W + t * W1 + w_id * I``: checked with scales that isolate each term."""
    scales = constant_scales(RepOptVGG(TINY))
    only_identity = {n: dict(conv=torch.zeros_like(e['conv']),
                             conv_1x1=torch.zeros_like(e['conv_1x1']),
                             **({'identity': torch.full_like(e['identity'], 2.0)}
                                if 'identity' in e else {}))
                     for n, e in scales.items()}
    model = RepOptVGG(TINY, scales=only_identity)
    model.init_weights()
    for name, block in model.repopt_blocks().items():
        expected = torch.zeros_like(block.conv.weight)
        if 'identity' in only_identity[name]:
            expected = 2 * identity_kernel(block.out_channels, 3)
        assert torch.equal(block.conv.weight, expected), name
    model.init_weights()  # a second call must not apply the rule again
    assert torch.equal(model.stage_3[1].conv.weight, 2 * identity_kernel(32, 3))
    # Constant scales: the kernels change, and the centre tap gains the 1x1 and identity.
    model = RepOptVGG(TINY)
    before = model.stage_3[1].conv.weight.detach().clone()
    model.init_weights()
    after = model.stage_3[1].conv.weight.detach()
    corner = 2 ** 0.5 * before[:, :, 0, 0]
    assert torch.allclose(after[:, :, 0, 0], corner)
    assert (after[:, :, 1, 1].diagonal() - 2 ** 0.5 * before[:, :, 1, 1].diagonal()).abs(
    ).min() > 0.5  # + t * W1 + 1


@pytest.mark.parametrize('mode', ['target', 'hs', 'csla'])
def test_fold_and_deploy(mode):
    torch.manual_seed(0)
    model = RepOptVGG(TINY, mode=mode, out_indices=ALL)
    if mode != 'target':  # scales away from their initial values
        gen = torch.Generator().manual_seed(1)
        for block in model.repopt_blocks().values():
            block.set_scales({key: torch.rand(block.out_channels, generator=gen) + 0.5
                              for key in ('conv', 'conv_1x1', 'identity')})
    model = randomize_bn(model, seed=2).double().eval()
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert err['max_rel'] < 1e-12, err
    # Every mode folds into the same deploy structure: one conv with bias per block.
    deploy = RepOptVGG(TINY, mode='target', out_indices=ALL, deploy=True).double()
    deploy.load_state_dict(folded.state_dict(), strict=True)
    assert not any(isinstance(m, _BatchNorm) for m in deploy.modules())
    with pytest.raises(ValueError, match='folded'):
        folded.repopt_grad_mults() if mode == 'target' else folded.get_scales()
    if mode != 'target':  # the CSLA form maps onto the target model exactly
        target = RepOptVGG(TINY, out_indices=ALL).double().eval()
        target.load_state_dict(model.target_state_dict(), strict=True)
        assert mmreparam.fold_error(model, target, torch.randn(
            1, 3, 32, 32, dtype=torch.float64))['max_rel'] < 1e-12


def test_frozen_stages_norm_eval_and_deploy_config():
    model = RepOptVGG(TINY, frozen_stages=1, norm_eval=True).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stage_1.parameters())
    assert all(p.requires_grad for p in model.stage_2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    wrapper = build_optim_wrapper(model, dict(constructor='mmreparam.RepOptimizerConstructor',
                                              optimizer=dict(type='SGD', lr=0.1)))
    frozen = model.stem.conv.weight.detach().clone()
    wrapper.update_params(model(torch.randn(2, 3, 32, 32))[0].mean())
    assert torch.equal(model.stem.conv.weight, frozen)
    cfg = Config(dict(default_scope='mmpretrain', model=dict(
        type='ImageClassifier', backbone=dict(type='mmreparam.RepOptVGG', scales='s.pth'))))
    assert deploy_config(cfg).model.backbone.deploy is True


def test_official_repopt_vgg_checkpoint_loads(tmp_path):
    """The official target layout (stage0.conv, stage1.0.bn, linear) loads as it is."""
    torch.manual_seed(0)
    source = randomize_bn(RepOptVGG(TINY, out_indices=ALL), seed=3).eval()
    official = {'linear.weight': torch.zeros(10, 128), 'linear.bias': torch.zeros(10),
                **official_repopt_keys(source.state_dict())}
    torch.save({'model': official}, tmp_path / 'RepOpt-VGG-tiny.pth')
    model = RepOptVGG(TINY, out_indices=ALL, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'RepOpt-VGG-tiny.pth')))
    model.init_weights()  # loaded, not re-initialized from scales
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), source(x)):
            assert torch.equal(a, b)


def check_repopt_optimizer(model, config_path):
    cfg = Config.fromfile(str(config_path))
    assert cfg.optim_wrapper.constructor == 'mmreparam.RepOptimizerConstructor'
    assert 'clip_grad' not in cfg.optim_wrapper
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert isinstance(wrapper.optimizer, RepOptSGD)
    assert len(wrapper.optimizer.grad_mults) == len(model.backbone.repopt_blocks())


def test_image_classifier_from_config(tmp_path):
    from mmpretrain.structures import DataSample
    model = build(tmp_path, f'''
_base_ = '{ROOT}/configs/mmpretrain/repopt-vgg-b1_8xb32-120e_in1k.py'
model = dict(backbone=dict(base_channels=8, scales='const'),
             head=dict(in_channels=256, num_classes=5))
''', 'mmpretrain')
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)] * 2,
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    check_train_step_and_fold(model, data, ('loss', ))
    check_repopt_optimizer(model, tmp_path / 'cfg.py')


def test_faster_rcnn_from_config(tmp_path):
    from mmdet.testing import demo_mm_inputs
    model = build(tmp_path, f'''
_base_ = '{ROOT}/configs/mmdet/faster-rcnn_repopt-vgg-b1_fpn_1x_coco.py'
model = dict(
    backbone=dict(base_channels=8, scales='const', init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 256], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32),
                  bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3)))
''', 'mmdet')
    data = demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 64), num_classes=3)
    check_train_step_and_fold(model, data, ('loss_rpn_cls', 'loss_cls'))
    check_repopt_optimizer(model, tmp_path / 'cfg.py')
