# BiSeNetV2 with OREPA in its backbone, trained from scratch on the synthetic
# Cityscapes-format shapes set (tools/generate_data.py), on CPU, then folded by FoldHook into
# the plain mmseg BiSeNetV2. To fit a few minutes on 2 cores the crops are small and the
# widths a quarter of BiSeNetV2's; the branches and block types are BiSeNetV2's.
_base_ = [
    'mmseg::_base_/models/bisenetv2.py', './synthetic_cityscapes_segmentation.py',
    'mmseg::_base_/default_runtime.py', '../_base_/reparam.py'
]
max_iters = 200
norm_cfg = dict(type='BN', requires_grad=True)
aux = dict(type='FCNHead', num_convs=2, num_classes=4, norm_cfg=norm_cfg, concat_input=False,
           align_corners=False,
           loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0))
model = dict(
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(
        _delete_=True, type='mmreparam.Reparameterized', reparam='OREPA',
        module=dict(type='BiSeNetV2', detail_channels=(16, 16, 32),
                    semantic_channels=(8, 8, 16, 32), semantic_expansion_ratio=6,
                    bga_channels=32, out_indices=(0, 1, 2, 3, 4), norm_cfg=norm_cfg,
                    init_cfg=None, align_corners=False)),
    decode_head=dict(in_channels=32, channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=[
        dict(in_channels=8, channels=8, in_index=1, **aux),
        dict(in_channels=8, channels=16, in_index=2, **aux),
        dict(in_channels=16, channels=32, in_index=3, **aux),
        dict(in_channels=32, channels=64, in_index=4, **aux),
    ])
optim_wrapper = dict(type='OptimWrapper', clip_grad=dict(max_norm=10),
                     optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=1e-4, power=1.0, begin=30, end=max_iters, by_epoch=False)
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
