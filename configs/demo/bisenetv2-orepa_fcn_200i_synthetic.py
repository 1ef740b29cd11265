# BiSeNetV2 with OREPA in its backbone, trained from scratch on the synthetic
# Cityscapes-format shapes set (tools/generate_data.py), on CPU, then folded by FoldHook into
# the plain mmseg BiSeNetV2. To fit a few minutes on 2 cores the crops are small and the
# widths a quarter of BiSeNetV2's; the branches and block types are BiSeNetV2's.
_base_ = [
    'mmseg::_base_/models/bisenetv2.py', './synthetic_cityscapes_segmentation.py',
    './_base_/schedule_200i_seg.py'
]
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
optim_wrapper = dict(optimizer=dict(lr=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', eta_min=1e-4, power=1.0, begin=30, end={{_base_.max_iters}},
         by_epoch=False)
]
