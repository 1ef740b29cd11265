# make demo: an OREPA-R50-D8 PSPNet trained from scratch on the synthetic Cityscapes-format
# shapes set (tools/generate_data.py), on CPU, then folded by FoldHook. To fit a few minutes on
# 2 cores the crops are small and the widths halved (base_channels=32): the depth, dilations
# and block types are those of OREPA-ResNetV1c-50-D8.
_base_ = [
    'mmseg::_base_/models/pspnet_r50-d8.py', './synthetic_cityscapes_segmentation.py',
    './_base_/schedule_200i_seg.py'
]
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(128, 128)),
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', deep_stem=True,
                  base_channels=32, norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(in_channels=1024, channels=64, num_classes=4, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=512, channels=32, num_classes=4, norm_cfg=norm_cfg))
