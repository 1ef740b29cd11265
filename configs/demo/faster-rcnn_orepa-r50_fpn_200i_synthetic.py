# make demo: an OREPA-R50 Faster R-CNN trained from scratch on the synthetic shapes set
# (tools/generate_data.py), on CPU, then folded by FoldHook. To fit a few minutes on 2 cores
# the images are small and the widths halved (base_channels=32): the depth and every block
# type are those of OREPA-ResNet-50.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py', './synthetic_coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py',
    '../_base_/reparam.py'
]
max_iters = 200
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', base_channels=32,
                  frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[128, 256, 512, 1024], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4], ratios=[1.0])),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64),
                  bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=3)),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100)))
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, eta_min=1e-4)
]
optim_wrapper = dict(optimizer=dict(lr=0.02), clip_grad=dict(max_norm=10))
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)
custom_hooks = [{{_base_.fold_hook}}]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
