# OREPA-VGG-A0 (RepVGG-A0 whose 3x3 branches are OREPA kernel generators) on ImageNet with the
# official OREPA recipe: 120 epochs, SGD lr 0.1 per 256 images, weight decay 1e-4 (none on
# biases and norms), bias lr x2, per-iteration cosine schedule. Folded into RepVGG-A0.
_base_ = ['mmpretrain::repvgg/repvgg-A0_8xb32_in1k.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.RepVGG', arch='A0', reparam='OREPA_VGG',
                  out_indices=(3, )))
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0.0, bias_decay_mult=0.0,
                       bias_lr_mult=2.0))
param_scheduler = dict(type='CosineAnnealingLR', T_max=120, by_epoch=True, begin=0, end=120,
                       convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=120)
custom_hooks = [{{_base_.fold_hook}}]
