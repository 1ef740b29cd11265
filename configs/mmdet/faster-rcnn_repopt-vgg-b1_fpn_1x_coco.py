# Faster R-CNN with a RepOpt-VGG-B1 backbone (plain 3x3 conv-BN-ReLU only) transferred from
# ImageNet. The paper (Ding et al., ICLR 2023, Table 7) finds RepOpt-VGG on par with RepVGG on
# COCO detection and Cityscapes segmentation. The backbone keeps training with the
# RepOptimizer and the scales of its ImageNet training (as YOLOv6 trains its RepOpt
# backbones), so it still trains as the multi-branch model it stands for; the neck and heads
# get plain SGD. Checkpoints in checkpoints/: the official RepOpt-VGG-B1-acc78.62.pth (or an
# mmreparam one) and RepOpt-VGG-B1-scales.pth, both read when training starts.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.RepOptVGG', arch='B1',
                  out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True,
                  scales='checkpoints/RepOpt-VGG-B1-scales.pth',
                  init_cfg=dict(type='Pretrained',
                                checkpoint='checkpoints/RepOpt-VGG-B1-acc78.62.pth')),
    neck=dict(in_channels=[128, 256, 512, 2048]))
optim_wrapper = dict(constructor='mmreparam.RepOptimizerConstructor')  # SGD 0.02 of the base
custom_hooks = [{{_base_.fold_hook}}]
