"""int8 post-training quantization (mmreparam.apis.quantize, tools/quantize.py).

A small OREPA-R18 Faster R-CNN (width 8) with random BatchNorm parameters and branch scales,
on generated 96x96 images, goes through the tool:
the int8 ONNX model holds int8 weights and quantize/dequantize nodes, is much smaller than
the float one, its outputs stay close to the float ones on held-back images, and the metric
of both runs through mmdet's CocoMetric with the heads in PyTorch. A small PSPNet goes
through the API. Bad input is one error line, and a failure writes nothing.
"""
import json
import shutil

import pytest
import torch
from helpers import ROOT, TINY_FASTER_RCNN, TINY_PSPNET, load_tool

pytest.importorskip('onnxruntime')


DET_CFG = '''
_base_ = '{root}/configs/demo/faster-rcnn_orepa-r50_fpn_200i_synthetic.py'
data_root = '{data}/det/'
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
''' + TINY_FASTER_RCNN

SEG_CFG = '''
_base_ = '{root}/configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py'
data_root = '{data}/seg/'
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
''' + TINY_PSPNET

NUM_VAL = 6


def quantize_tool():
    """tools/quantize.py as a module (its ``main(argv)`` returns the exit status)."""
    return load_tool('quantize')


def build_model(cfg):
    """The config's model, built in its toolbox's scope (as the tools build it)."""
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    init_default_scope(cfg.default_scope)
    return models_registry(cfg.default_scope).build(cfg.model)


def build_trained_looking(cfg_path, seed):
    """The config's model as after training: random OREPA branch scales and BN affine
    parameters, and BN statistics measured on the images (random ones make the features
    explode, and the heads of a detector then keep no box)."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    from torch.nn.modules.batchnorm import _BatchNorm

    from mmreparam.testing import randomize_bn, randomize_parameters
    cfg = Config.fromfile(str(cfg_path))
    torch.manual_seed(seed)
    model = build_model(cfg)
    randomize_parameters(model, ('vector', 'idconv1'), seed=seed)
    randomize_bn(model, seed=seed + 1)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in Runner.build_dataloader(cfg.val_dataloader):
            model.extract_feat(model.data_preprocessor(batch, False)['inputs'])
    for norm in norms:
        norm.momentum = 0.1
    return cfg, model.eval()


@pytest.fixture(scope='module')
def det(tmp_path_factory):
    """``(config path, checkpoint path)`` of the small detector on generated data."""
    from mmreparam.datasets import generate_coco_detection
    root = tmp_path_factory.mktemp('quantize_det')
    generate_coco_detection(str(root / 'data' / 'det'), num_train=1, num_val=NUM_VAL,
                            size=96, seed=0)
    cfg_path = root / 'det.py'
    cfg_path.write_text(DET_CFG.format(root=ROOT, data=root / 'data'))
    _, model = build_trained_looking(cfg_path, seed=0)
    ckpt = root / 'det.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    return cfg_path, ckpt


def test_tool_quantizes_a_detector_end_to_end(det, tmp_path):
    import onnx
    cfg, ckpt = det
    out = tmp_path / 'int8'
    assert quantize_tool().main([str(cfg), str(ckpt), str(out), '--calib', '4', '--eval', '2',
                                 '--latency-runs', '3']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['model.onnx', 'model_int8.onnx',
                                                     'report.json']
    report = json.loads((out / 'report.json').read_text())

    # The int8 file holds int8 convolution weights behind quantize/dequantize nodes.
    graph = onnx.load(str(out / 'model_int8.onnx')).graph
    ops = {node.op_type for node in graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear', 'Conv'} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
                    and len(t.dims) == 4]
    float_convs = sum(n.op_type == 'Conv' for n in onnx.load(str(out / 'model.onnx')).graph.node)
    assert len(int8_weights) == float_convs > 20
    size_float, size_int8 = ((out / f).stat().st_size for f in ('model.onnx', 'model_int8.onnx'))
    assert report['float']['size_bytes'] == size_float
    assert report['int8']['size_bytes'] == size_int8
    assert size_int8 < 0.4 * size_float

    # The five FPN levels, int8 against float on the held-back images.
    assert report['quantized'] == 'backbone + neck (extract_feat)'
    assert report['data'] == dict(split='val', input_shape=[1, 3, 96, 96], calib_images=4,
                                  eval_images=2, eval_image_indices=[4, 5])
    assert [o['shape'][1:] for o in report['outputs']] == [[16, 24, 24], [16, 12, 12],
                                                           [16, 6, 6], [16, 3, 3], [16, 2, 2]]
    # Measured here: worst-image cosine 0.97-0.99, relative error 0.13-0.23 (the same at
    # widths 8 to 32 with these random weights); a wrong scale or zero point gives far less.
    for o in report['outputs']:
        assert o['cosine_min'] > 0.95 and o['cosine'] >= o['cosine_min'] - 1e-9, o
        assert 0 < o['rel_error'] < 0.3, o
    assert report['float_onnx_vs_pytorch_max_rel'] < 1e-4
    assert report['float']['latency_ms'] > 0 and report['int8']['latency_ms'] > 0

    # Both feature extractors through mmdet's CocoMetric, heads in PyTorch.
    assert report['metric_images'] == NUM_VAL
    for form in ('float', 'int8'):
        metrics = report[form]['metrics']
        assert 'coco/bbox_mAP' in metrics and 0 <= metrics['coco/bbox_mAP'] <= 1, metrics


def test_api_quantizes_a_segmentor(tmp_path):
    from mmreparam.apis import quantize_int8
    from mmreparam.datasets import generate_cityscapes_segmentation
    generate_cityscapes_segmentation(str(tmp_path / 'data' / 'seg'), num_train=1, num_val=4,
                                     size=64, seed=1)
    cfg_path = tmp_path / 'seg.py'
    cfg_path.write_text(SEG_CFG.format(root=ROOT, data=tmp_path / 'data'))
    cfg, model = build_trained_looking(cfg_path, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize_int8(model, cfg, str(tmp_path / 'out'), calib_images=3, eval_images=1,
                           latency_runs=2)
    # The model given is not changed (folded and patched copies only).
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert 'extract_feat' not in vars(model)
    assert report['quantized'] == 'backbone (extract_feat)'  # PSPNet has no neck
    assert [o['shape'][1] for o in report['outputs']] == [8, 16, 32, 64]
    assert min(o['cosine_min'] for o in report['outputs']) > 0.95
    assert set(report['float']['metrics']) == set(report['int8']['metrics']) >= {'mIoU'}
    assert json.loads((tmp_path / 'out' / 'report.json').read_text()) == report


def test_a_failure_writes_nothing(det, tmp_path, monkeypatch):
    """The evaluator fails after both ONNX models are complete: no file is written."""
    from mmengine.config import Config

    from mmreparam.apis import quantize as quantize_module
    from mmreparam.apis.quantize import quantize_int8

    def broken(*args, **kwargs):
        raise RuntimeError('evaluator failed (injected)')

    monkeypatch.setattr(quantize_module, '_evaluate', broken)
    cfg_path, ckpt = det
    cfg = Config.fromfile(str(cfg_path))
    model = build_model(cfg)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'model_int8.onnx').write_text('previous')
    with pytest.raises(RuntimeError, match='injected'):
        quantize_int8(model, cfg, str(out), calib_images=2, eval_images=1, latency_runs=1)
    assert [p.name for p in out.iterdir()] == ['model_int8.onnx']
    assert (out / 'model_int8.onnx').read_text() == 'previous'


def test_images_of_another_size_are_refused(det, tmp_path, capsys):
    """The ONNX model has one input shape: a calibration image of another size is an error
    that names both shapes, and nothing is written."""
    from PIL import Image
    cfg, ckpt = det
    data = tmp_path / 'data' / 'det'
    shutil.copytree(cfg.parent / 'data' / 'det', data)
    image = data / 'val' / 'val_00001.png'
    Image.open(image).resize((96, 64)).save(image)  # 96x64: the rest are 96x96
    odd_cfg = tmp_path / 'det.py'
    odd_cfg.write_text(DET_CFG.format(root=ROOT, data=tmp_path / 'data'))
    assert quantize_tool().main([str(odd_cfg), str(ckpt), str(tmp_path / 'out'),
                                 '--calib', '3', '--eval', '1']) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'a calibration image reaches the model as (1, 3, 64, 96), the ' \
        'ONNX model was exported for (1, 3, 96, 96)' in err[0], err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, message', [
    (('{missing}', '{ckpt}', '{out}'), 'does not exist'),
    (('{cfg}', '{ckpt}', '{ckpt}'), 'is a file'),
    (('{cfg}', '{ckpt}', '{out}', '--calib', '0'), '--calib must be at least 1'),
    (('{cfg}', '{ckpt}', '{out}', '--calib', '5', '--eval', '2'),
     f'has {NUM_VAL} images, fewer than the 5 calibration + 2 held-back images'),
])
def test_tool_refuses_bad_input(det, tmp_path, capsys, args, message):
    cfg, ckpt = det
    names = dict(cfg=cfg, ckpt=ckpt, out=tmp_path / 'out', missing=tmp_path / 'missing.py')
    argv = [a.format(**names) for a in args]
    assert quantize_tool().main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('tools/quantize.py: error: ') \
        and message in err[0], err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('available, asked, expected', [
    (16, (None, None), (12, 4)),  # the demo's val set
    (100, (None, None), (32, 8)),
    (40, (None, None), (32, 8)),
    (6, (None, None), (5, 1)),
    (2, (None, None), (1, 1)),
    (16, (4, None), (4, 8)),
    (16, (14, None), (14, 2)),
    (16, (None, 6), (10, 6)),
    (16, (10, 6), (10, 6)),
])
def test_image_numbers_fit_the_data_unless_given(available, asked, expected):
    from mmreparam.apis.quantize import split_images
    assert split_images(available, *asked) == expected


@pytest.mark.parametrize('available, asked', [(1, (None, None)), (6, (5, 2)),
                                              (16, (16, None)), (16, (None, 16))])
def test_image_numbers_that_do_not_fit_name_the_options(available, asked):
    from mmreparam.apis.quantize import split_images
    with pytest.raises(ValueError, match=f'data set has {available} images, fewer than .*'
                       '--calib / --eval'):
        split_images(available, *asked)


def test_tool_without_calib_and_eval_fits_the_data_and_warns(det, tmp_path, capsys):
    """``tools/quantize.py CONFIG CKPT OUT_DIR`` as the README shows it, on a data set
    smaller than the default 32 + 8 images (it used to fail)."""
    import logging

    from mmengine.logging import MMLogger
    cfg, ckpt = det
    out = tmp_path / 'int8'
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        status = quantize_tool().main([str(cfg), str(ckpt), str(out), '--no-metric',
                                       '--latency-runs', '1'])
    finally:
        logger.removeHandler(handler)
    assert status == 0, capsys.readouterr().err
    report = json.loads((out / 'report.json').read_text())
    assert (report['data']['calib_images'], report['data']['eval_images']) == (NUM_VAL - 1, 1)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(f'the val data set has {NUM_VAL} images: calibrating on {NUM_VAL - 1} and '
               'holding back 1' in w for w in warnings), warnings
