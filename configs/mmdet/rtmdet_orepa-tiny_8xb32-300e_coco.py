# RTMDet-tiny with OREPA in its CSPNeXt backbone and CSPNeXtPAFPN neck: each conv -> BN pair
# (all 33 of the backbone and 31 of the neck, depthwise 5x5 included) becomes an OREPA block
# expanded exactly from the pair (mmreparam.reparameterize, when the model is built).
# The backbone keeps mmdet's Pretrained init: the ImageNet CSPNeXt-tiny checkpoint loads
# into the upstream keys and expands into the blocks. Folded after training (FoldHook) into
# the plain mmdet RTMDet-tiny: deploy_config.py names no mmreparam type.
_base_ = ['mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py', '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.Reparameterized', reparam='OREPA',
                  module={{_base_.model.backbone}}),
    neck=dict(_delete_=True, type='mmreparam.Reparameterized', reparam='OREPA',
              module={{_base_.model.neck}}))
# RTMDet's own hooks (EMA: FoldHook folds the EMA weights; the pipeline switch), plus FoldHook.
custom_hooks = [
    dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0002, update_buffers=True,
         priority=49),
    dict(type='PipelineSwitchHook', switch_epoch=280,
         switch_pipeline={{_base_.train_pipeline_stage2}}),
    {{_base_.fold_hook}}
]
