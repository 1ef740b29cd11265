"""Post-training static int8 quantization of a folded OpenMMLab model with onnxruntime.

What is quantized is the model's feature extractor, ``extract_feat``: the backbone, and the
neck when the model has one (mmdet detectors, mmseg segmentors and mmpretrain classifiers
all define it). It is exported to ONNX (:func:`~mmreparam.apis.onnx.export_onnx`) from the
folded model and quantized with ``onnxruntime.quantization.quantize_static``: QDQ format,
per-channel symmetric int8 weights, uint8 activations calibrated with MinMax on images of the
config's val (else test) dataloader. The heads and the post-processing stay in PyTorch
float32: to measure a metric, the model's ``extract_feat`` is replaced by an onnxruntime
session and the model runs through the config's evaluator as the test loop runs it.

Why uint8 activations with int8 weights (U8S8) by default: it is what onnxruntime 1.31
recommends for x86 CPUs (the measured comparison with int8 activations, S8S8, is in
docs/en/user_guides/int8.md). Activations are quantized asymmetrically (a zero point per
tensor), so a post-ReLU range keeps all 256 levels.
``activation_type='int8'`` selects S8S8, what onnxruntime recommends on ARM CPUs. On x86
CPUs without VNNI, onnxruntime advises 7-bit weights (``reduce_range``) against saturation;
that is not done here.
"""
import contextlib
import copy
import itertools
import json
import logging
import math
import os.path as osp
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..fileio import atomic_write_files
from .fold import fold
from .onnx import export_onnx, onnxruntime_error

FLOAT_ONNX = 'model.onnx'
INT8_ONNX = 'model_int8.onnx'
REPORT = 'report.json'
ACTIVATION_TYPES = ('uint8', 'int8')


class _FeatureExtractor(nn.Module):
    """``model.extract_feat`` as a module of its own, for the ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.extract_feat(x)


DEFAULT_CALIB_IMAGES = 32
DEFAULT_EVAL_IMAGES = 8


def split_images(available: int, calib_images: Optional[int] = None,
                 eval_images: Optional[int] = None) -> Tuple[int, int]:
    """The numbers of calibration and held-back images to use out of ``available``.

    A number given is used as it is. One not given fits the data: up to
    ``DEFAULT_EVAL_IMAGES`` (8) held-back images, at most a quarter of the data set (at
    least 1) when both are left out, else what the calibration images leave; and up to
    ``DEFAULT_CALIB_IMAGES`` (32) calibration images, as many as the held-back ones leave.
    E.g. 16 images give 12 + 4, 100 give 32 + 8.

    Args:
        available (int): Number of images in the data set.
        calib_images (int, optional): Calibration images asked for; None: fit the data.
        eval_images (int, optional): Held-back images asked for; None: fit the data.

    Returns:
        tuple[int, int]: ``(calib_images, eval_images)``.

    Raises:
        ValueError: The data set cannot hold both (the message names the tool's options
            ``--calib`` / ``--eval`` next to the arguments).
    """
    if eval_images is None:
        room = available // 4 if calib_images is None else available - calib_images
        eval_images = max(1, min(DEFAULT_EVAL_IMAGES, room))
    if calib_images is None:
        calib_images = min(DEFAULT_CALIB_IMAGES, available - eval_images)
    if calib_images < 1 or eval_images < 1 or calib_images + eval_images > available:
        raise ValueError(
            f'the data set has {available} images, fewer than the {calib_images} calibration '
            f'+ {eval_images} held-back images asked for (the held-back ones must differ from '
            'the calibration ones): ask for fewer (calib_images / eval_images; in '
            'tools/quantize.py --calib / --eval), or leave them out to fit the data')
    return calib_images, eval_images


def quantize_int8(model: nn.Module, cfg, out_dir: str, calib_images: Optional[int] = None,
                  eval_images: Optional[int] = None, activation_type: str = 'uint8',
                  evaluate: bool = True, latency_runs: int = 10) -> Dict[str, Any]:
    """Fold ``model``, export its feature extractor to ONNX and quantize it to int8.

    Writes, as one (:func:`~mmreparam.fileio.atomic_write_files`: after a failure none of
    them is written or replaced), into ``out_dir``:

    - ``model.onnx``: the float32 ``extract_feat`` (backbone, and neck if any) of the
      folded model;
    - ``model_int8.onnx``: its static int8 quantization (QDQ, per-channel int8 weights);
    - ``report.json``: what was quantized and how, the relative error and cosine
      similarity of every int8 output against the float one on ``eval_images`` held-back
      images (not used for calibration), the file sizes, the onnxruntime CPU latency of both
      (median of ``latency_runs``) and, with ``evaluate`` and an evaluator in the config,
      the metric of the float and the int8 feature extractor under the PyTorch heads.

    The same numbers are logged as a table. The calibration images are the first
    ``calib_images`` of the dataloader, the held-back ones the next ``eval_images`` (when
    not given, as many as fit the data, up to 32 and 8: see :func:`split_images`); the
    metric is measured on the whole data set (calibration images included). All images
    must reach the model with one size (the ONNX export has a fixed input shape).

    Args:
        model (nn.Module): An OpenMMLab model with weights (train-time or already folded;
            not changed) that has ``data_preprocessor`` and ``extract_feat``, built in the
            default scope of its toolbox.
        cfg (Config): Its config: ``val_dataloader`` (else ``test_dataloader``) gives the
            images, ``val_evaluator`` (else ``test_evaluator``) the metric.
        out_dir (str): Output directory (created if needed).
        calib_images (int, optional): Number of calibration images. Defaults to None: up
            to 32, as the data allows (a WARNING says when fewer are used).
        eval_images (int, optional): Number of held-back images for the error report.
            Defaults to None: up to 8, a quarter of the data at most.
        activation_type (str): ``'uint8'`` or ``'int8'`` activations (see the module's
            documentation). Defaults to 'uint8'.
        evaluate (bool): Measure the metric when the config has an evaluator. Defaults to
            True.
        latency_runs (int): Timed runs of each model (after 2 warm-up runs). Defaults to 10.

    Returns:
        dict: The report (as written to ``report.json``).

    Raises:
        ValueError: Bad arguments, a model without ``extract_feat`` / ``data_preprocessor``,
            a config without a val or test dataloader, fewer images than
            ``calib_images + eval_images``, or images of different sizes.
        ImportError: onnxruntime is not installed.
        NotADirectoryError: ``out_dir`` is a file.
    """
    _check_arguments(model, out_dir, calib_images, eval_images, activation_type, latency_runs)
    ort, quantization = _import_onnxruntime()
    split, loader_cfg, evaluator_cfg = _data_split(cfg)
    loader = _single_image_loader(loader_cfg)
    asked = calib_images, eval_images
    try:
        calib_images, eval_images = split_images(len(loader.dataset), *asked)
    except ValueError as err:
        raise ValueError(f'the {split} {err}') from None
    if (calib_images, eval_images) != (asked[0] or DEFAULT_CALIB_IMAGES,
                                       asked[1] or DEFAULT_EVAL_IMAGES):
        print_log(f'mmreparam.quantize: the {split} data set has {len(loader.dataset)} '
                  f'images: calibrating on {calib_images} and holding back {eval_images} '
                  f'(defaults {DEFAULT_CALIB_IMAGES} + {DEFAULT_EVAL_IMAGES}; fewer calibration '
                  'images give coarser activation ranges)', logger='current',
                  level=logging.WARNING)
    folded = fold(model).eval()
    extractor = _FeatureExtractor(folded).eval()
    images = _preprocessed_images(folded, loader)
    first = next(images)
    shape = tuple(first.shape)
    # chain, not a generator with ``yield from``: closing that would close ``images`` too
    images = itertools.chain([first], images)
    with tempfile.TemporaryDirectory(prefix='mmreparam-quantize-') as tmp:
        paths = dict(float=osp.join(tmp, FLOAT_ONNX), int8=osp.join(tmp, INT8_ONNX))
        export_onnx(extractor, torch.from_numpy(first), paths['float'])
        print_log(f'mmreparam.quantize: calibrating on {calib_images} {split} image(s) of '
                  f'shape {shape}', logger='current')
        _quantize(quantization, paths['float'], paths['int8'],
                  _take(images, calib_images, shape, 'calibration'), calib_images,
                  activation_type)
        sessions = {form: _session(ort, path) for form, path in paths.items()}
        held_back = list(_take(images, eval_images, shape, 'held-back'))
        report = dict(
            quantized=_quantized_part(folded),
            not_quantized='heads and post-processing (PyTorch, float32)',
            method=dict(tool='onnxruntime.quantization.quantize_static', format='QDQ',
                        per_channel=True, weights='int8 (symmetric)',
                        activations=f'{activation_type} (asymmetric)', calibration='MinMax'),
            data=dict(split=split, input_shape=list(shape), calib_images=calib_images,
                      eval_images=eval_images,
                      eval_image_indices=[calib_images, calib_images + eval_images - 1]),
            outputs=_compare_outputs(sessions['float'], sessions['int8'], held_back),
            float_onnx_vs_pytorch_max_rel=onnxruntime_error(
                paths['float'], extractor, torch.from_numpy(held_back[0])),
            latency=dict(runs=latency_runs, statistic='median', provider='CPUExecutionProvider',
                         allow_spinning=False, input_shape=list(shape)))
        for form, name in (('float', FLOAT_ONNX), ('int8', INT8_ONNX)):
            report[form] = dict(file=name, size_bytes=osp.getsize(paths[form]),
                                latency_ms=_latency_ms(sessions[form], held_back[0],
                                                       latency_runs))
        if evaluate and evaluator_cfg:
            report['metric_images'] = len(loader.dataset)
            for form in ('float', 'int8'):
                report[form]['metrics'] = _evaluate(folded, sessions[form], loader,
                                                    evaluator_cfg, shape, form)
        atomic_write_files({
            osp.join(out_dir, FLOAT_ONNX): lambda dst: shutil.copyfile(paths['float'], dst),
            osp.join(out_dir, INT8_ONNX): lambda dst: shutil.copyfile(paths['int8'], dst),
            osp.join(out_dir, REPORT): lambda dst: _write_json(dst, report),
        })
    print_log(format_report(report), logger='current')
    return report


def _quantize(quantization, float_path: str, int8_path: str, images: Iterator[np.ndarray],
              count: int, activation_type: str) -> None:
    """onnxruntime's static quantization: QDQ, per-channel int8 weights, MinMax ranges."""
    activations = dict(int8=quantization.QuantType.QInt8,
                       uint8=quantization.QuantType.QUInt8)[activation_type]
    quantization.quantize_static(
        float_path, int8_path, _calibration_reader(images, count, quantization),
        quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        weight_type=quantization.QuantType.QInt8, activation_type=activations,
        calibrate_method=quantization.CalibrationMethod.MinMax)


def format_report(report: Dict[str, Any]) -> str:
    """The report of :func:`quantize_int8` as markdown tables (what it logs)."""
    data, fp, q = report['data'], report['float'], report['int8']
    lines = [
        f'int8 post-training quantization of the {report["quantized"]}: onnxruntime '
        f'{report["method"]["format"]}, per-channel int8 weights, '
        f'{report["method"]["activations"]} activations, {report["method"]["calibration"]} '
        f'calibration on {data["calib_images"]} {data["split"]} image(s); '
        f'{report["not_quantized"]}', '',
        f'| | float ({fp["file"]}) | int8 ({q["file"]}) |', '|---|---|---|',
        f'| file size | {fp["size_bytes"] / 2**20:.2f} MiB | {q["size_bytes"] / 2**20:.2f} MiB |',
        f'| onnxruntime CPU latency, median of {report["latency"]["runs"]} '
        f'({"x".join(map(str, data["input_shape"]))}) | {fp["latency_ms"]:.1f} ms | '
        f'{q["latency_ms"]:.1f} ms |'
    ]
    for name in fp.get('metrics', {}):
        lines.append(f'| {name} ({report["metric_images"]} images incl. the calibration ones; '
                     'heads in PyTorch) | '
                     f'{fp["metrics"][name]:.4g} | {q["metrics"][name]:.4g} |')
    lines += ['', f'int8 vs float on {data["eval_images"]} held-back image(s):', '',
              '| output | shape | relative error (L2) | cosine | worst image cosine |',
              '|---|---|---|---|---|']
    for i, out in enumerate(report['outputs']):
        lines.append(f'| {i} | {"x".join(map(str, out["shape"]))} | {out["rel_error"]:.4f} | '
                     f'{out["cosine"]:.5f} | {out["cosine_min"]:.5f} |')
    return '\n'.join(lines)


def _quantized_part(model: nn.Module) -> str:
    with_neck = getattr(model, 'with_neck', getattr(model, 'neck', None) is not None)
    return f'{"backbone + neck" if with_neck else "backbone"} (extract_feat)'


def _check_arguments(model, out_dir, calib_images, eval_images, activation_type,
                     latency_runs) -> None:
    for name, value in (('calib_images', calib_images), ('eval_images', eval_images),
                        ('latency_runs', latency_runs)):
        if value is None and name != 'latency_runs':
            continue
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f'activation_type must be one of {ACTIVATION_TYPES}, got '
                         f'{activation_type!r}')
    missing = [a for a in ('data_preprocessor', 'extract_feat') if not hasattr(model, a)]
    if missing:
        raise ValueError(f'{type(model).__name__} has no {" or ".join(missing)}: quantization '
                         'needs an OpenMMLab detector, segmentor or classifier')
    if osp.exists(out_dir) and not osp.isdir(out_dir):
        raise NotADirectoryError(f'output directory {out_dir!r} is a file')


def _import_onnxruntime():
    try:
        import onnxruntime
        import onnxruntime.quantization as quantization
    except ImportError as err:
        raise ImportError(f'int8 quantization needs onnx and onnxruntime (pip install '
                          f'"mmreparam[deploy]", see requirements/deploy.txt): {err}') from err
    return onnxruntime, quantization


def _data_split(cfg) -> Tuple[str, dict, Optional[Any]]:
    """``(split, dataloader cfg, evaluator cfg or None)``: val when the config has it."""
    for split in ('val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if loader:
            return split, loader, cfg.get(f'{split}_evaluator')
    raise ValueError('the config has no val_dataloader or test_dataloader: there are no '
                     'images to calibrate on')


def _single_image_loader(loader_cfg):
    """The dataloader of ``loader_cfg`` with one image per batch (in the config's order)."""
    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(loader_cfg)
    loader_cfg['batch_size'] = 1
    return Runner.build_dataloader(loader_cfg)


def _preprocessed_images(model: nn.Module, loader) -> Iterator[np.ndarray]:
    """Each image as the model's ``data_preprocessor`` gives it: float32, ``1xCxHxW``."""
    for batch in loader:
        inputs = model.data_preprocessor(batch, False)['inputs']
        yield inputs.detach().cpu().float().numpy()


def _take(images, count: int, shape: tuple, what: str) -> Iterator[np.ndarray]:
    for _ in range(count):
        image = next(images)
        _check_shape(image.shape, shape, what)
        yield image


def _check_shape(got: Sequence[int], expected: Sequence[int], what: str) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f'a {what} image reaches the model as {tuple(got)}, the ONNX model '
                         f'was exported for {tuple(expected)}: int8 quantization needs one '
                         'input size (make the test pipeline resize/pad all images to one '
                         'size, e.g. with --cfg-options)')


def _calibration_reader(images: Iterator[np.ndarray], count: int, quantization):
    """An ``onnxruntime.quantization.CalibrationDataReader`` of ``count`` images, with a
    progress bar (the class is made here so that this module imports without onnxruntime).

    The progress bars write to ``sys.stdout`` as it is when they start (mmengine's default is
    the one at its import), so that a redirection or pytest's capture applies.
    """
    from mmengine.utils import track_iter_progress

    class Reader(quantization.CalibrationDataReader):

        def __init__(self):
            self.images = iter(track_iter_progress((images, count), file=sys.stdout))

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {'input': image}

    return Reader()


def _session(ort, path: str):
    """A CPU session whose idle threads sleep instead of spinning: spinning ones took the
    cores from the PyTorch heads that run next (evaluation 3x slower on 2 cores) and, on a
    loaded machine, from onnxruntime itself (2x its latency)."""
    options = ort.SessionOptions()
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def _run(session, image: np.ndarray) -> List[np.ndarray]:
    return session.run(None, {'input': image})


def _compare_outputs(float_session, int8_session,
                     images: List[np.ndarray]) -> List[Dict[str, Any]]:
    """Per output: relative L2 error, cosine similarity (all images, and the worst image)
    and the largest absolute difference relative to the largest absolute float value."""
    stats = None
    for image in images:
        ref, out = _run(float_session, image), _run(int8_session, image)
        if stats is None:
            stats = [dict(shape=list(o.shape), diff2=0.0, ref2=0.0, out2=0.0, dot=0.0,
                          max_diff=0.0, max_ref=0.0, cosine_min=math.inf) for o in ref]
        for s, r, q in zip(stats, ref, out):
            r, q = r.astype(np.float64).ravel(), q.astype(np.float64).ravel()
            dot, ref2, out2 = float(r @ q), float(r @ r), float(q @ q)
            s['diff2'] += float(np.sum((q - r) ** 2))
            s['ref2'] += ref2
            s['out2'] += out2
            s['dot'] += dot
            s['max_diff'] = max(s['max_diff'], float(np.max(np.abs(q - r))))
            s['max_ref'] = max(s['max_ref'], float(np.max(np.abs(r))))
            s['cosine_min'] = min(s['cosine_min'], _cosine(dot, ref2, out2))
    return [dict(shape=s['shape'],
                 rel_error=math.sqrt(s['diff2'] / s['ref2']) if s['ref2'] > 0
                 else math.sqrt(s['diff2']),
                 cosine=_cosine(s['dot'], s['ref2'], s['out2']),
                 cosine_min=s['cosine_min'],
                 max_abs_rel=s['max_diff'] / s['max_ref'] if s['max_ref'] > 0
                 else s['max_diff']) for s in stats]


def _cosine(dot: float, ref2: float, out2: float) -> float:
    """Cosine similarity; 1 for two zero vectors, 0 when only one of them is zero."""
    if ref2 == 0 or out2 == 0:
        return 1.0 if ref2 == out2 else 0.0
    return dot / math.sqrt(ref2 * out2)


def _latency_ms(session, image: np.ndarray, runs: int) -> float:
    """Median milliseconds of one run, after 2 warm-up runs."""
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        _run(session, image)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def _features_from(model: nn.Module, session, shape: tuple):
    """Within the block, ``model.extract_feat`` runs ``session`` (one image at a time)."""
    def extract_feat(inputs: torch.Tensor):
        per_image = []
        for image in inputs.detach().cpu().float().numpy():
            image = image[None]
            _check_shape(image.shape, shape, 'test')
            per_image.append(_run(session, image))
        return tuple(torch.from_numpy(np.concatenate(outputs)).to(inputs.device)
                     for outputs in zip(*per_image))

    model.extract_feat = extract_feat
    try:
        yield model
    finally:
        del model.extract_feat


@torch.no_grad()
def _evaluate(model: nn.Module, session, loader, evaluator_cfg, shape: tuple,
              form: str) -> Dict[str, float]:
    """The metrics of ``model`` with its features from ``session``, as the test loop runs
    it (``test_step`` then the evaluator, over the whole data set)."""
    from mmengine.evaluator import Evaluator
    from mmengine.utils import track_iter_progress
    evaluator = evaluator_cfg if isinstance(evaluator_cfg, Evaluator) \
        else Evaluator(copy.deepcopy(evaluator_cfg))
    evaluator.dataset_meta = getattr(loader.dataset, 'metainfo', None)
    print_log(f'mmreparam.quantize: evaluating the {form} feature extractor', logger='current')
    with _features_from(model, session, shape):
        for batch in track_iter_progress((loader, len(loader)), file=sys.stdout):
            evaluator.process(data_samples=model.test_step(batch), data_batch=batch)
    metrics = evaluator.evaluate(len(loader.dataset))
    return {k: float(v) for k, v in metrics.items() if _is_number(v)}


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _write_json(path: str, obj: Any) -> None:
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2)


__all__ = ['quantize_int8', 'split_images', 'format_report', 'FLOAT_ONNX', 'INT8_ONNX', 'REPORT']
