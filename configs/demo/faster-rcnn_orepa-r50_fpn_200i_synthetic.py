# make demo: an OREPA-R50 Faster R-CNN trained from scratch on the synthetic shapes set
# (tools/generate_data.py), on CPU, then folded by FoldHook. To fit a few minutes on 2 cores
# the images are small and the widths halved (base_channels=32): the depth and every block
# type are those of OREPA-ResNet-50.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py', './synthetic_coco_detection.py',
    './_base_/schedule_200i_det.py'
]
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', base_channels=32,
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[128, 256, 512, 1024], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4], ratios=[1.0])),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64),
                  bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=3)),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))
optim_wrapper = dict(optimizer=dict(lr=0.02), clip_grad=dict(max_norm=10))
