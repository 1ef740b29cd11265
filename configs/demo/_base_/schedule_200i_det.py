# The demo detectors' 200 iterations on CPU (make demo): warmup then cosine decay, logs every
# 20 iterations, one checkpoint and FoldHook's deploy pair at the end, gloo for several
# processes. The optimizer is each detector's own (its config sets it).
_base_ = [
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py',
    '../../_base_/reparam.py'
]
max_iters = 200
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=max_iters, eta_min=1e-4)
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
log_processor = dict(by_epoch=False)
custom_hooks = [{{_base_.fold_hook}}]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
