# make demo: an OREPA-R50-D8 PSPNet trained from scratch on the synthetic Cityscapes-format
# shapes set (tools/generate_data.py), on CPU, then folded by FoldHook. To fit a few minutes on
# 2 cores the crops are small and the widths halved (base_channels=32): the depth, dilations
# and block types are those of OREPA-ResNetV1c-50-D8.
_base_ = [
    'mmseg::_base_/models/pspnet_r50-d8.py', './synthetic_cityscapes_segmentation.py',
    'mmseg::_base_/default_runtime.py', '../_base_/reparam.py'
]
max_iters = 200
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', deep_stem=True,
                  base_channels=32, norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(in_channels=1024, channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=512, channels=32, num_classes=4, norm_cfg=norm_cfg))
optim_wrapper = dict(type='OptimWrapper', clip_grad=dict(max_norm=10),
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=30, end=max_iters, by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
custom_hooks = [{{_base_.fold_hook}}]
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
