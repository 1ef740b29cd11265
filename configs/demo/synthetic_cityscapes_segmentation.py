# The synthetic Cityscapes-format shapes set written by tools/generate_data.py (make demo):
# leftImg8bit/ and gtFine/ folders, *_gtFine_labelTrainIds.png label maps, 4 classes.
_base_ = 'mmseg::_base_/datasets/cityscapes.py'
data_root = 'work_dirs/demo/data/seg/'
crop_size = (128, 128)
metainfo = dict(classes=('background', 'square', 'circle', 'triangle'),
                palette=[[0, 0, 0], [220, 20, 60], [0, 130, 200], [250, 190, 30]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='_leftImg8bit.png', seg_map_suffix='_gtFine_labelTrainIds.png',
               reduce_zero_label=False)
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, pipeline=train_pipeline,
                 data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
                 **dataset))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, pipeline=test_pipeline,
                 data_prefix=dict(img_path='leftImg8bit/val', seg_map_path='gtFine/val'),
                 **dataset))
test_dataloader = val_dataloader
