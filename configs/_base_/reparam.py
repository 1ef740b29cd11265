# Pieces for configs with re-parameterized backbones. Inherit this file next to an upstream
# config and refer to the pieces as {{_base_.NAME}}; see configs/mmdet/*.py for examples.

# Fold after training: writes deploy.pth and deploy_config.py into the work dir.
fold_hook = dict(type='mmreparam.FoldHook')

# Transfer from ImageNet: the OREPA README advises a separate learning rate for the stem
# (OREPA's 7x7 stem is a deep linear stack of three 3x3 kernel generators).
stem_lr_mult = dict(custom_keys={'backbone.stem': dict(lr_mult=0.1)})

# ImageNet checkpoints (any format mmreparam detects: official OREPA / DBB / RepVGG
# releases, mmpretrain, torchvision or mmdet ResNets; see README). Put them in checkpoints/.
imagenet_r50 = dict(type='Pretrained', checkpoint='checkpoints/resnet50-0676ba61.pth')
imagenet_r50_v1c = dict(type='Pretrained', checkpoint='checkpoints/resnet50_v1c-2cccc1ad.pth')
imagenet_repvgg_a0 = dict(type='Pretrained', checkpoint='checkpoints/RepVGG-A0-train.pth')
