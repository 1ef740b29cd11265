# BiSeNetV2 with OREPA in its backbone (detail and semantic branches): each conv -> BN pair
# (all 52, depthwise convs included) becomes an OREPA block expanded exactly from the pair
# (mmreparam.reparameterize, when the model is built). Trained from scratch as mmseg's
# BiSeNetV2; folded after training (FoldHook) into the plain mmseg BiSeNetV2:
# deploy_config.py names no mmreparam type.
_base_ = ['mmseg::bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py',
          '../_base_/reparam.py']
model = dict(
    backbone=dict(_delete_=True, type='mmreparam.Reparameterized', reparam='OREPA',
                  module={{_base_.model.backbone}}))
custom_hooks = [{{_base_.fold_hook}}]
