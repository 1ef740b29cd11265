"""The fold check of FoldHook and tools/fold.py on a two-stage detector.

A Faster R-CNN ranks its region proposals and keeps them through NMS: two near-tied
proposals swap places under a rounding difference of 1e-7, after which the RoI head outputs,
compared row by row, differ by O(1) though the fold is exact (reported on a 4-iteration demo
run: 'max rel 0.029' and fold_check='failed'). The check compares what the fold can change:
the features, the RPN's dense outputs, and the RoI head on the same proposals.
"""
import logging
import types

import pytest
import torch
from mmengine.config import Config
from torch.nn.modules.batchnorm import _BatchNorm

import mmreparam
from mmreparam.apis.fold_check import check_fold, fold_check_messages, fold_error_on_batch
from mmreparam.testing import randomize_bn, randomize_parameters

pytest.importorskip('mmdet')

SIZE = 64

DETECTOR = dict(
    type='FasterRCNN',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='mmreparam.ResNet', depth=18, base_channels=8, reparam='OREPA',
                  out_indices=(0, 1, 2, 3), norm_eval=False, init_cfg=None),
    neck=dict(type='FPN', in_channels=[8, 16, 32, 64], out_channels=16, num_outs=5),
    rpn_head=dict(
        type='RPNHead', in_channels=16, feat_channels=16,
        anchor_generator=dict(type='AnchorGenerator', scales=[2], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(type='SingleRoIExtractor',
                                roi_layer=dict(type='RoIAlign', output_size=7,
                                               sampling_ratio=0),
                                out_channels=16, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type='Shared2FCBBoxHead', in_channels=16, fc_out_channels=32,
                       roi_feat_size=7, num_classes=3,
                       bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.],
                                       target_stds=[0.1, 0.1, 0.2, 0.2]),
                       reg_class_agnostic=False,
                       loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                     loss_weight=1.0),
                       loss_bbox=dict(type='L1Loss', loss_weight=1.0))),
    train_cfg=None,
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50, nms=dict(type='nms', iou_threshold=0.7),
                           min_bbox_size=0),
                  rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
                            max_per_img=20)))


@pytest.fixture(scope='module')
def detector():
    """A small OREPA-R18 Faster R-CNN with random branch scales and BN parameters, eval."""
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = models_registry('mmdet').build(Config(dict(model=DETECTOR)).model)
    randomize_parameters(model, ('vector', 'idconv1'), seed=0)
    randomize_bn(model, seed=1)
    # Running statistics measured on images, as after training (random ones make the
    # features explode, and the RPN then keeps no proposal).
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        model.extract_feat(model.data_preprocessor(batch(4), False)['inputs'])
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def batch(images=1):
    from mmdet.structures import DetDataSample
    torch.manual_seed(1)
    samples = []
    for _ in range(images):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE),
                                 scale_factor=(1.0, 1.0)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
                        for _ in range(images)], data_samples=samples)


def swap_two_proposals(folded):
    """What rounding did on the demo run: in the folded model's proposal list of the first
    image, two proposals trade places (their boxes and scores are those of an exact fold)."""
    predict = folded.rpn_head.predict

    def swapped(*args, **kwargs):
        results = predict(*args, **kwargs)
        first = results[0]
        assert len(first) >= 2, 'the test needs two proposals'
        order = torch.arange(len(first))
        order[[0, 1]] = order[[1, 0]]
        results[0] = first[order]
        return results

    folded.rpn_head.predict = swapped


def test_proposals_in_another_order_are_not_a_fold_error(detector):
    folded = mmreparam.fold(detector)
    exact = fold_error_on_batch(detector, folded, batch())
    assert exact['max_rel'] < 2e-5, exact
    swap_two_proposals(folded)
    # Row by row, as the tensor-mode outputs were compared: an O(1) 'error'.
    data = detector.data_preprocessor(batch(), False)
    with torch.no_grad():
        ref = detector(data['inputs'], data['data_samples'], mode='tensor')
        out = folded(data['inputs'], data['data_samples'], mode='tensor')
    assert (ref[0][0] - out[0][0]).abs().max() > 1e-3 * ref[0][0].abs().max()
    # The check compares the features, the RPN outputs and the RoI head on the same
    # proposals: the fold is exact.
    err = fold_error_on_batch(detector, folded, batch())
    assert err['max_rel'] < 2e-5, err
    assert err['measured_on'] == ('backbone + neck features, RPN outputs, RoI head outputs on '
                                  'the same proposals')
    assert set(err['parts']) == {'backbone + neck features', 'RPN outputs',
                                 'RoI head outputs on the same proposals'}
    record, measured = check_fold(detector, folded, lambda: ('a validation batch', batch()))
    assert record['status'] == 'passed' and measured['max_rel'] < 2e-5
    assert 'swapped' in vars(folded.rpn_head)['predict'].__name__  # the instance's, restored
    assert 'predict' not in vars(detector.rpn_head)


def test_fold_hook_does_not_call_that_fold_failed(detector):
    """FoldHook's check (the shared check_fold) on the same detector and batch."""
    folded = mmreparam.fold(detector)
    swap_two_proposals(folded)
    hook = mmreparam.FoldHook()
    runner = types.SimpleNamespace(val_dataloader=[batch()])
    record = hook._check(runner, detector, folded, ('val_dataloader', ))
    assert record['status'] == 'passed', record
    assert record['measured_on'].startswith('a validation batch (backbone + neck features')
    assert hook.last_fold_error['max_rel'] < 2e-5


@pytest.mark.parametrize('module, part', [
    ('neck.fpn_convs.0.conv', 'backbone + neck features'),
    ('rpn_head.rpn_reg', 'RPN outputs'),
    ('roi_head.bbox_head.fc_cls', 'RoI head outputs on the same proposals'),
])
def test_a_wrong_fold_anywhere_is_still_found(detector, module, part):
    """Each part that the fold could change is compared: an error of 1% there fails."""
    folded = mmreparam.fold(detector)
    with torch.no_grad():
        folded.get_submodule(module).weight.mul_(1.01)
    record, err = check_fold(detector, folded, lambda: ('a validation batch', batch()))
    assert record['status'] == 'failed', err
    assert err['parts'][part]['max_rel'] > 1e-4
    (_, info), (level, error) = fold_check_messages(record, err)
    assert level == logging.ERROR and f'{part} ' in error and 'above max_rel_error' in error


def test_no_proposal_left_compares_features_and_rpn(detector, monkeypatch):
    """A barely trained detector keeps no proposal: the RoI head's outputs are empty, and
    the check still compares the features and the RPN outputs."""
    folded = mmreparam.fold(detector)
    for model in (detector, folded):
        monkeypatch.setitem(model.rpn_head.test_cfg, 'min_bbox_size', 10000)
    err = fold_error_on_batch(detector, folded, batch())
    assert err['measured_on'] == 'backbone + neck features, RPN outputs'
    assert err['max_rel'] < 2e-5
