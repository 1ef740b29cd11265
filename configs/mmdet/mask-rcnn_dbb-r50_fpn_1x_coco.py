# DBB (Diverse Branch Block) ResNet-50: 3x3 convs are DBB blocks, folded after training.
# Transfer from an ImageNet checkpoint (see configs/_base_/reparam.py and README).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='DBB', init_cfg={{_base_.imagenet_r50}}))
custom_hooks = [{{_base_.fold_hook}}]
