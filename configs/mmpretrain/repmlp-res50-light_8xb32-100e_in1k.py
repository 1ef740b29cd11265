# RepMLP-Res50-light on ImageNet with the paper's recipe (Ding et al., "RepMLP", arXiv
# 2105.01883, Sec. 4.2): 100 epochs, batch 256 on 8 GPUs, SGD momentum 0.9, weight decay 1e-4,
# cosine annealing from lr 0.1 to 0, mixup, AutoAugment + random crop and flip; test: single
# central crop. The model is the official create_RepMLPRes50_Light_224 (h = w = 7, local
# kernels 1/3/5, fc3 groups 4). FoldHook writes the folded model at the end.
_base_ = ['mmpretrain::resnet/resnet50_8xb32-mixup_in1k.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.RepMLPResNet', arch='light', img_size=224,
                  out_indices=(3, )))
bgr_mean = [103.53, 116.28, 123.675]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='AutoAugment', policies='imagenet',
         hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', T_max=100, eta_min=0.0,
                       by_epoch=True, begin=0, end=100, convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
custom_hooks = [{{_base_.fold_hook}}]
