# Hyper-search (HS) for RepOpt-VGG-B1 (Ding et al., "Re-parameterizing Your Optimizers rather
# than Architectures", ICLR 2023, Sec. 3.3): train the constant-scale multi-branch model with
# *trainable* scales on CIFAR-100; the learned scales become the RepOptimizer's constants.
# Recipe of the official DingXiaoH/RepOptimizers README: 1 GPU x 256 images, 240 epochs, SGD
# lr 0.1, momentum 0.9, weight decay 4e-5, 5 warm-up epochs then cosine, no label smoothing.
# As in the official code, the branch scales themselves get no weight decay (the identity
# scale does); BN parameters and biases get none either.
# Then: python tools/repopt_scales.py extract WORK_DIR/epoch_240.pth scales.pth --arch B1
# and train configs/mmpretrain/repopt-vgg-b1_8xb32-120e_in1k.py with those scales.
_base_ = ['mmpretrain::_base_/datasets/cifar100_bs16.py',
          'mmpretrain::_base_/default_runtime.py', '../_base_/reparam.py']

model = dict(
    type='ImageClassifier',
    backbone=dict(type='mmreparam.RepOptVGG', arch='B1', mode='hs', out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=100, in_channels=2048,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))

train_dataloader = dict(batch_size=256)
val_dataloader = dict(batch_size=256)
test_dataloader = val_dataloader

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=4e-5),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={'scale_conv': dict(decay_mult=0.0),
                                    'scale_1x1': dict(decay_mult=0.0)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=235, by_epoch=True, begin=5, end=240,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=240, val_interval=10)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=256)
custom_hooks = [{{_base_.fold_hook}}]
