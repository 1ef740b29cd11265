# RepOpt-VGG-B1 (Ding et al., "Re-parameterizing Your Optimizers rather than Architectures",
# ICLR 2023): a plain VGG (3x3 conv-BN-ReLU only, 28 layers) trained with a RepOptimizer.
# Recipe of the paper (Sec. 4.1) and of the official DingXiaoH/RepOptimizers README /
# main_repopt.py: 8 GPUs x 32 images, 120 epochs, SGD lr 0.1, momentum 0.9 with Nesterov,
# weight decay 4e-5 (none on BN parameters and biases: official set_weight_decay), 5 linear
# warm-up epochs inside a per-iteration cosine schedule over all 120 epochs (timm
# CosineLRScheduler, warmup from 0), label smoothing 0.1, RandomResizedCrop 224 + flip +
# RandAugment (official preset 'raug15'), test: resize 224, centre crop 224 (TEST.CROP False).
# Official result: 78.62% top-1 (released RepOpt-VGG-B1-acc78.62.pth, 51.8M parameters).
# The RepOptimizer's constants: the official hyper-search release RepOpt-VGG-B1-scales.pth
# (searched on CIFAR-100), in checkpoints/; it is read when training starts, not when the
# config is built. Without it: --cfg-options model.backbone.scales=const (the paper's
# "same as HS initialization" ablation). Never add clip_grad: clipping breaks the equivalence
# with the multi-branch model the RepOptimizer stands for (official README).
_base_ = ['mmpretrain::repvgg/repvgg-B1_8xb32_in1k.py', '../_base_/reparam.py']

repopt_b1_scales = 'checkpoints/RepOpt-VGG-B1-scales.pth'
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.RepOptVGG', arch='B1', out_indices=(3, ),
                  scales=repopt_b1_scales),
    head=dict(in_channels=2048,
              loss=dict(_delete_=True, type='LabelSmoothLoss', label_smooth_val=0.1,
                        mode='original', loss_weight=1.0)))

bgr_mean = [103.53, 116.28, 123.675]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    # The official RandAugPolicy(magnitude=15) applies 2 random ops with a level drawn
    # uniformly from 0..14 on a 0..10 scale; mmpretrain caps the level at total_level.
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=10, magnitude_std='inf',
         hparams=dict(pad_val=[round(x) for x in bgr_mean])),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=224, edge='short', backend='pillow'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))

optim_wrapper = dict(
    _delete_=True,
    constructor='mmreparam.RepOptimizerConstructor',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
# Both schedulers multiply the lr: warm-up over epochs 0-5 on top of the 120-epoch cosine.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=120, by_epoch=True, begin=0, end=120,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=120)
custom_hooks = [{{_base_.fold_hook}}]
