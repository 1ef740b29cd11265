# mmreparam.ResNet with plain ConvBN blocks (reparam='base'): the ResNetV1c-50-D8 baseline.
# Transfer from an ImageNet ResNetV1c checkpoint (see configs/_base_/reparam.py, README).
_base_ = [
    'mmseg::deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py',
    '../_base_/reparam.py'
]
model = dict(
    pretrained=None,
    backbone=dict(type='mmreparam.ResNet', reparam='base', deep_stem=True,
                  init_cfg={{_base_.imagenet_r50_v1c}}))
custom_hooks = [{{_base_.fold_hook}}]
