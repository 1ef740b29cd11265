# RTMDet-tiny with OREPA in its CSPNeXt backbone and CSPNeXtPAFPN neck, trained from scratch
# on the synthetic shapes set (tools/generate_data.py), on CPU, then folded by FoldHook into
# the plain mmdet RTMDet. To fit a few minutes on 2 cores the images are small and the
# widths a third of RTMDet-tiny's (widen_factor=0.125); depth and block types are tiny's.
# The model is RTMDet's (mmdet's rtmdet_l config) with BN and without the ImageNet init.
_base_ = ['./synthetic_coco_detection.py', './_base_/schedule_200i_det.py']
norm_cfg = dict(type='BN')
act_cfg = dict(type='SiLU', inplace=True)
model = dict(
    type='RTMDet',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[103.53, 116.28, 123.675],
                           std=[57.375, 57.12, 58.395], bgr_to_rgb=False,
                           pad_size_divisor=32, batch_augments=None),
    backbone=dict(
        type='mmreparam.Reparameterized', reparam='OREPA',
        module=dict(type='CSPNeXt', arch='P5', expand_ratio=0.5, deepen_factor=0.167,
                    widen_factor=0.125, channel_attention=True, norm_cfg=norm_cfg,
                    act_cfg=act_cfg)),
    neck=dict(
        type='mmreparam.Reparameterized', reparam='OREPA',
        module=dict(type='CSPNeXtPAFPN', in_channels=[32, 64, 128], out_channels=32,
                    num_csp_blocks=1, expand_ratio=0.5, norm_cfg=norm_cfg, act_cfg=act_cfg)),
    bbox_head=dict(
        type='RTMDetSepBNHead', num_classes=3, in_channels=32, stacked_convs=2,
        feat_channels=32,
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=[8, 16, 32]),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        with_objectness=False, exp_on_reg=False, share_conv=True, pred_kernel_size=1,
        norm_cfg=norm_cfg, act_cfg=act_cfg),
    train_cfg=dict(assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
                   allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.001,
                  nms=dict(type='nms', iou_threshold=0.65), max_per_img=100))
optim_wrapper = dict(_delete_=True, type='OptimWrapper', clip_grad=dict(max_norm=10),
                     optimizer=dict(type='AdamW', lr=0.004, weight_decay=0.05),
                     paramwise_cfg=dict(norm_decay_mult=0, bias_decay_mult=0,
                                        bypass_duplicate=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end={{_base_.max_iters}},
         eta_min=2e-4)
]
