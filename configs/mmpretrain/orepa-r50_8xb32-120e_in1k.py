# OREPA-ResNet-50 on ImageNet with the official OREPA recipe (JUGGHM/OREPA_CVPR2022 train.py):
# 120 epochs, SGD lr 0.1 per 256 images, momentum 0.9, weight decay 1e-4 (none on biases and
# norms), bias lr x2, cosine schedule stepped per iteration, RandomResizedCrop(224) + flip;
# test: resize 256, centre crop 224. FoldHook writes the folded ResNet-50 at the end.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(type='mmreparam.ResNet', reparam='OREPA', norm_eval=False, init_cfg=None))
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, bias_lr_mult=2.0))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', T_max=120, by_epoch=True,
                       begin=0, end=120, convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
custom_hooks = [{{_base_.fold_hook}}]
