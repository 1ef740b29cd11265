# OREPA ResNetV1c-50-D8 (deep stem, dilated): 3x3 -> OREPA, 1x1 -> OREPA1x1; folded after
# training into a plain ResNetV1c-50-D8.
# Transfer from an ImageNet ResNetV1c checkpoint (see configs/_base_/reparam.py, README).
_base_ = ['mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', '../_base_/reparam.py']
model = dict(
    pretrained=None,
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', deep_stem=True,
                  init_cfg={{_base_.imagenet_r50_v1c}}))
optim_wrapper = dict(paramwise_cfg={{_base_.stem_lr_mult}})
custom_hooks = [{{_base_.fold_hook}}]
