# mmreparam.ResNet with plain ConvBN blocks (reparam='base'): the baseline, equal to a ResNet-50.
# Transfer from an ImageNet checkpoint (see configs/_base_/reparam.py and README).
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='base', init_cfg={{_base_.imagenet_r50}}))
custom_hooks = [{{_base_.fold_hook}}]
