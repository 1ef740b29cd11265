"""mmreparam.RepMLPResNet: both arches fold exactly, deploy=True builds the folded structure,
input-size rules, frozen stages; inside mmpretrain / mmdet / mmseg models built from upstream
configs (through the helpers test_in_toolboxes uses). Widths and inputs are reduced.
"""
import copy

import pytest
import torch
from helpers import build, check_train_step_and_fold, pspnet_config, seg_batch
from mmengine.config import Config

import mmreparam
from mmreparam.apis.deploy import deploy_config
from mmreparam.models.backbones import RepMLPResNet
from mmreparam.models.backbones.repmlp_resnet import RepMLPBottleneckUnit, RepMLPLightUnit
from mmreparam.models.layers import Foldable, RepMLPBlock
from mmreparam.testing import randomize_bn, randomize_parameters

# Partition GP at a fixed 64x64 input (stage maps 8x8, 4x4); channel GP at any size, padded.
PARTITION = dict(img_size=64, partition_size=(4, 2), reparam_conv_kernels=(1, ))
CHANNEL = dict(global_perceptron='channel', partition_size=(3, 5), reparam_conv_kernels=(1, 3),
               pad_input=True)


def unfolded_left(model):
    return [m for m in model.modules() if isinstance(m, Foldable) and not m.folded]


@pytest.mark.parametrize('arch', ['light', 'bottleneck'])
@pytest.mark.parametrize('gp,size', [('partition', (64, 64)), ('channel', (50, 70))])
def test_folds_exactly(arch, gp, size):
    kwargs = dict(PARTITION if gp == 'partition' else CHANNEL, arch=arch, base_channels=16,
                  out_indices=(0, 1, 2, 3))
    torch.manual_seed(0)
    model = RepMLPResNet(**kwargs)
    unit = RepMLPLightUnit if arch == 'light' else RepMLPBottleneckUnit
    assert [len([u for u in layer if isinstance(u, unit)]) for layer in model.stage_modules()
            ] == [0, 3, 5, 0]  # every stride-1 unit of c3 and c4 (paper)
    randomize_parameters(model, ('', ), seed=1, scale=0.1)
    model = randomize_bn(model, seed=2).double().eval()
    folded = mmreparam.fold(model)
    assert not unfolded_left(folded)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    err = mmreparam.fold_error(model, folded, x)
    assert err['max_rel'] < 1e-10, err
    err32 = mmreparam.fold_error(model.float(), copy.deepcopy(folded).float(), x.float())
    assert err32['max_rel'] < 1e-5, err32
    deploy = RepMLPResNet(**kwargs, deploy=True).double()
    assert not unfolded_left(deploy)
    deploy.load_state_dict(folded.state_dict(), strict=True)
    model.switch_to_deploy()  # the mmpretrain-style in-place name
    assert model.deploy and list(model.state_dict()) == list(deploy.state_dict())


def test_input_sizes():
    model = RepMLPResNet(base_channels=8, **PARTITION).eval()
    with pytest.raises(ValueError, match='takes 64x64 inputs only'):
        model(torch.randn(1, 3, 96, 64))
    with pytest.raises(ValueError, match='stage 2 maps are 7x7'):
        RepMLPResNet(base_channels=8, img_size=56, partition_size=4, reparam_conv_kernels=(1, ))
    model = RepMLPResNet(base_channels=8, global_perceptron=None, partition_size=4,
                         reparam_conv_kernels=(1, 3)).eval()
    with pytest.raises(ValueError, match='pad_input=True'):
        model(torch.randn(1, 3, 40, 40))
    model = RepMLPResNet(base_channels=8, **CHANNEL, out_indices=(1, 2)).eval()
    assert [o.shape[2:] for o in model(torch.randn(1, 3, 33, 47))] == [(5, 6), (3, 3)]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='arch'):
        RepMLPResNet('heavy')
    with pytest.raises(ValueError, match='one value per RepMLP stage'):
        RepMLPResNet(dict(unit='light', repmlp_widths=(2, ), fc3_groups=4))
    with pytest.raises(ValueError, match='global_perceptron'):
        RepMLPResNet(global_perceptron='spatial')
    with pytest.raises(ValueError, match='gp_reduction'):
        RepMLPResNet(gp_reduction=(1, 2, 4))
    with pytest.raises(ValueError, match='reparam'):
        RepMLPResNet(reparam='XYZ')


def test_frozen_stages_norm_eval_and_custom_arch():
    arch = dict(unit='bottleneck', stage_blocks=(1, 2, 2, 1), repmlp_stages=(2, ),
                repmlp_widths=(2, ), fc3_groups=(2, ))
    model = RepMLPResNet(arch, base_channels=8, frozen_stages=1, norm_eval=True,
                         reparam='ACB', img_size=32, partition_size=2,
                         reparam_conv_kernels=(1, )).train()
    assert isinstance(model.layer3[1], RepMLPBottleneckUnit)
    assert isinstance(model.layer3[1].repmlp, RepMLPBlock) and model.layer3[1].repmlp.groups == 2
    frozen = [model.stem, model.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_image_classifier(tmp_path):
    from mmpretrain.structures import DataSample
    backbone = dict(type='mmreparam.RepMLPResNet', arch='light', base_channels=16,
                    img_size=32, partition_size=(2, 1), reparam_conv_kernels=(1, ),
                    gp_reduction=(1, 2), init_cfg=None)
    text = f'''
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
model = dict(backbone=dict(_delete_=True, **{backbone!r}), head=dict(in_channels=512,
             num_classes=5))
'''
    model = build(tmp_path, text, 'mmpretrain')
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)] * 2,
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    folded = check_train_step_and_fold(model, data, ('loss', ))
    assert not unfolded_left(folded)
    # deploy_config builds exactly the folded model.
    cfg = deploy_config(Config.fromfile(str(tmp_path / 'cfg.py')))
    from mmpretrain.registry import MODELS
    deployed = MODELS.build(cfg.model)
    assert cfg.model.backbone.deploy is True and not unfolded_left(deployed)
    deployed.load_state_dict(folded.state_dict(), strict=True)


def test_faster_rcnn_any_input_size(tmp_path):
    from mmdet.testing import demo_mm_inputs
    backbone = dict(type='mmreparam.RepMLPResNet', arch='light', base_channels=16,
                    out_indices=(0, 1, 2, 3), init_cfg=None, **CHANNEL)
    model = build(tmp_path, f'''
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(_delete_=True, **{backbone!r}),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32),
                  bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3)))
''', 'mmdet')
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, 64, 96), (3, 80, 64)],
                          num_classes=3)
    folded = check_train_step_and_fold(model, data, ('loss_rpn_cls', 'loss_cls'))
    assert not unfolded_left(folded)


def test_dilated_pspnet_with_fixed_crops(tmp_path):
    # The paper's Cityscapes setting: fixed crops, partition GP, no dilation in c4.
    backbone = dict(type='mmreparam.RepMLPResNet', arch='bottleneck', base_channels=16,
                    strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), img_size=64,
                    partition_size=2, reparam_conv_kernels=(1, ), out_indices=(0, 1, 2, 3),
                    init_cfg=None)
    model = build(tmp_path, pspnet_config(backbone, 256, 512), 'mmseg')
    folded = check_train_step_and_fold(model, seg_batch(), ('decode.loss_ce', ))
    assert not unfolded_left(folded)
