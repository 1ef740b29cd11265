"""Both backbones inside real mmdet / mmseg / mmpretrain models built from upstream configs.

Each model is built from a config that inherits the upstream one (``mmdet::``, ``mmseg::``,
``mmpretrain::``) and only swaps the backbone for ``type='mmreparam.X'`` (no
``custom_imports``); it runs a training step (forward + backward), is folded with
``mmreparam.fold``, and must give the same outputs afterwards. Widths are reduced.
"""
import pytest
import torch
from helpers import build, check_train_step_and_fold, pspnet_config, seg_batch

RESNET = dict(type='mmreparam.ResNet', depth=50, reparam='OREPA', base_channels=16,
              norm_cfg=dict(type='BN'), init_cfg=None)
# width_factor chosen so that the stage widths are 16, 32, 64, 128.
REPVGG_ARCH = dict(num_blocks=[1, 2, 2, 1], width_factor=[0.25, 0.25, 0.25, 0.25])
REPVGG = dict(type='mmreparam.RepVGG', arch=REPVGG_ARCH, reparam='OREPA_VGG',
              out_indices=(0, 1, 2, 3), init_cfg=None)
BACKBONES = {
    'resnet': (RESNET, [64, 128, 256, 512]),
    'repvgg': (REPVGG, [16, 32, 64, 128]),
}


@pytest.mark.parametrize('name', list(BACKBONES))
def test_faster_rcnn(tmp_path, name):
    from mmdet.testing import demo_mm_inputs
    backbone, channels = BACKBONES[name]
    model = build(tmp_path, f'''
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
model = dict(
    backbone=dict(_delete_=True, **{backbone!r}),
    neck=dict(in_channels={channels}, out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=32),
                  bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=3)))
''', 'mmdet')
    data = demo_mm_inputs(batch_size=2, image_shapes=(3, 64, 64), num_classes=3)
    check_train_step_and_fold(model, data, ('loss_rpn_cls', 'loss_cls'))


@pytest.mark.parametrize('name', list(BACKBONES))
def test_dilated_pspnet(tmp_path, name):
    backbone, channels = BACKBONES[name]
    backbone = dict(backbone)
    if name == 'resnet':  # ResNetV1c-D8: deep stem, dilated last stages
        backbone.update(deep_stem=True, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                        contract_dilation=True)
    else:
        backbone.update(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))
    model = build(tmp_path, pspnet_config(backbone, channels[2], channels[3]), 'mmseg')
    check_train_step_and_fold(model, seg_batch(), ('decode.loss_ce', ))


@pytest.mark.parametrize('name', list(BACKBONES))
def test_image_classifier(tmp_path, name):
    from mmpretrain.structures import DataSample
    backbone, channels = BACKBONES[name]
    backbone = dict(backbone, out_indices=(3, ))
    model = build(tmp_path, f'''
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
model = dict(backbone=dict(_delete_=True, **{backbone!r}),
             head=dict(in_channels={channels[3]}, num_classes=5))
''', 'mmpretrain')
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)] * 2,
                data_samples=[DataSample().set_gt_label(i) for i in range(2)])
    check_train_step_and_fold(model, data, ('loss', ))
