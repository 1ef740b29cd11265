# OREPA ResNet-50: 3x3 -> OREPA, 1x1 -> OREPA1x1, 7x7 stem -> OREPALargeConv (a linear
# stack of three 3x3 kernel generators); folded after training into a plain ResNet-50.
# Transfer from an ImageNet checkpoint (see configs/_base_/reparam.py and README).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', init_cfg={{_base_.imagenet_r50}}))
# Stem lr multiplier (OREPA README); it takes effect when the stem trains, i.e. with
# frozen_stages=-1 (mmdet's default frozen_stages=1 keeps the stem frozen).
optim_wrapper = dict(paramwise_cfg={{_base_.stem_lr_mult}})
custom_hooks = [{{_base_.fold_hook}}]
