# Faster R-CNN with an OREPA-VGG-A0 backbone (RepVGG-A0 whose 3x3 branches are OREPA kernel
# generators), transferred from ImageNet and folded into a plain VGG-style network.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.RepVGG', arch='A0', reparam='OREPA_VGG',
                  out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True,
                  init_cfg={{_base_.imagenet_repvgg_a0}}),
    neck=dict(in_channels=[48, 96, 192, 1280]))
optim_wrapper = dict(paramwise_cfg={{_base_.stem_lr_mult}})
custom_hooks = [{{_base_.fold_hook}}]
