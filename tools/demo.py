"""The demo (``make demo``): train, fold and test an OREPA-R50 detector and segmentor on CPU.

Steps, each through the real tools: generate the synthetic data sets
(``tools/generate_data.py``); train an OREPA-R50 Faster R-CNN (mmdet) and an OREPA-R50-D8
PSPNet (mmseg) with ``tools/train.py`` — :class:`mmreparam.FoldHook` writes ``deploy.pth``
and ``deploy_config.py`` at the end; test the train-time checkpoint and the folded one with
``tools/test.py``; quantize the folded backbone (+ neck) to int8 with onnxruntime
(:func:`mmreparam.apis.quantize_int8`, a few calibration images) and measure the metric
with it under the PyTorch heads; then print (and save) a table of the metrics before and
after the fold and after int8 quantization, the int8 vs float error, the parameter counts and
the CPU latency of each form.
"""
import argparse
import contextlib
import json
import logging
import os
import os.path as osp
import statistics
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# int8 calibration and held-back images (of the 16 val images): few, to keep the demo short.
CALIB_IMAGES = 8
EVAL_IMAGES = 8
TASKS = {
    'det': dict(config='configs/demo/faster-rcnn_orepa-r50_fpn_200i_synthetic.py',
                metric='coco/bbox_mAP',
                label='Faster R-CNN, OREPA-R50 half width (mmdet): bbox mAP'),
    'seg': dict(config='configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py', metric='mIoU',
                label='PSPNet, OREPA-R50-D8 half width (mmseg): mIoU (%)'),
}


def run(step: str, cmd: list, log_path: str) -> None:
    """Run a tool as a step of the demo (:func:`mmreparam.cli.steps.run_step`)."""
    from mmreparam.cli.steps import run_step
    run_step(step, cmd, log_path, cwd=ROOT, prefix='[demo]')


@contextlib.contextmanager
def output_to(log_path: str):
    """Send what this process prints (print, warnings, mmengine's console log) to a log
    file for the duration of the block, as :func:`run` keeps a tool's whole log."""
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance()  # the console handler exists before the redirection
    handlers = [h for logger in MMLogger._instance_dict.values() for h in logger.handlers
                if type(h) is logging.StreamHandler]  # console, not file handlers
    with open(log_path, 'w') as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        streams = [h.setStream(log) for h in handlers]
        try:
            yield
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)


def latency(model, inputs, repeats=10) -> float:
    """Median seconds of one forward (eval, no grad) after two warm-up runs."""
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(**inputs)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(config: str, checkpoint: str, int8_dir: str) -> dict:
    """Parameters and latency of the train-time model and its fold, on one val batch, and
    the int8 quantization of the fold (its report, see :func:`quantize_int8`)."""
    import copy

    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmreparam
    from mmreparam.apis import quantize_int8
    from mmreparam.cli.model import build_model, load_weights
    cfg = Config.fromfile(osp.join(ROOT, config))
    for split in ('val', 'test'):
        dataset = cfg[f'{split}_dataloader'].dataset
        dataset.data_root = osp.join(ROOT, dataset.data_root)
        evaluator = cfg.get(f'{split}_evaluator')
        if evaluator and evaluator.get('ann_file'):
            evaluator.ann_file = osp.join(ROOT, evaluator.ann_file)
    model = build_model(cfg)
    load_weights(model, checkpoint)
    model.eval()
    folded = mmreparam.fold(model)
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batch = model.data_preprocessor(copy.deepcopy(next(iter(loader))), False)
    inputs = dict(inputs=batch['inputs'][:1], data_samples=batch['data_samples'][:1],
                  mode='tensor')
    stats = dict(params=sum(p.numel() for p in model.parameters()),
                 params_folded=sum(p.numel() for p in folded.parameters()),
                 latency=latency(model, inputs), latency_folded=latency(folded, inputs))
    stats['int8'] = quantize_int8(folded, cfg, int8_dir, calib_images=CALIB_IMAGES,
                                  eval_images=EVAL_IMAGES, latency_runs=10)
    return stats


def measure_task(n: int, task: str, ckpt: str, metrics: dict, work: str) -> tuple:
    """Step ``n`` of a task after its tests: :func:`measure` (its output kept in
    ``WORK/TASK_measure.log``); returns the task's row for :func:`results_table`."""
    spec = TASKS[task]
    print(f'[demo] {n}. {task}: measuring parameters and latency; int8 quantization of '
          f'the folded backbone (+ neck), {CALIB_IMAGES} calibration images', flush=True)
    int8_dir = osp.join(work, task, 'int8')
    with output_to(osp.join(work, f'{task}_measure.log')):
        stats = measure(spec['config'], ckpt, int8_dir)
    int8, metric = stats['int8'], spec['metric']
    print(f'        int8: {metric} {int8["int8"]["metrics"][metric]:.3f} (float ONNX '
          f'{int8["float"]["metrics"][metric]:.3f}); {int8["float"]["size_bytes"] / 2**20:.1f}'
          f' -> {int8["int8"]["size_bytes"] / 2**20:.1f} MiB; '
          f'{osp.relpath(osp.join(int8_dir, "report.json"), ROOT)}', flush=True)
    meta = torch.load(osp.join(work, task, 'deploy.pth'), map_location='cpu',
                      weights_only=True)['meta']
    return spec['label'], metric, metrics, stats, meta.get('fold_error') or {}


def results_table(rows) -> str:
    """The demo's table (markdown): one row per task from :func:`measure_task`."""
    lines = [
        '| model | metric, train-time | metric, folded | metric, int8 (float ONNX) | '
        'fold error (max rel) | int8 vs float features: worst cosine, rel. error | '
        'params train-time / folded | CPU latency train-time / folded (1 image) | '
        'onnxruntime latency float / int8 (backbone + neck if any) |',
        '|---|---|---|---|---|---|---|---|---|'
    ]
    for label, metric, metrics, stats, err in rows:
        int8 = stats['int8']
        outputs = int8['outputs']
        lines.append(
            f'| {label} | {metrics["train-time"]:.3f} | {metrics["folded"]:.3f} | '
            f'{int8["int8"]["metrics"][metric]:.3f} '
            f'({int8["float"]["metrics"][metric]:.3f}) | '
            f'{err.get("max_rel", float("nan")):.2g} | '
            f'{min(o["cosine_min"] for o in outputs):.4f}, '
            f'{max(o["rel_error"] for o in outputs):.3f} | '
            f'{stats["params"] / 1e6:.1f}M / {stats["params_folded"] / 1e6:.1f}M | '
            f'{stats["latency"] * 1e3:.0f} ms / {stats["latency_folded"] * 1e3:.0f} ms | '
            f'{int8["float"]["latency_ms"]:.0f} ms / {int8["int8"]["latency_ms"]:.0f} ms |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    work = osp.join(ROOT, args.work_dir)
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    start = time.time()
    run('1. generating the synthetic data sets',
        [py, 'tools/generate_data.py', '--root', osp.join(args.work_dir, 'data')],
        osp.join(work, 'generate_data.log'))
    rows = []
    for n, task in enumerate(args.tasks, 2):
        spec = TASKS[task]
        task_dir = osp.join(work, task)
        run(f'{n}. {task}: training {spec["config"]} (FoldHook folds at the end)',
            [py, 'tools/train.py', spec['config'], '--work-dir', task_dir],
            osp.join(work, f'{task}_train.log'))
        with open(osp.join(task_dir, 'last_checkpoint')) as f:
            ckpt = f.read().strip()
        metrics = {}
        for form, cfg_path, ckpt_path in (
                ('train-time', spec['config'], ckpt),
                ('folded', osp.join(task_dir, 'deploy_config.py'),
                 osp.join(task_dir, 'deploy.pth'))):
            out = osp.join(task_dir, f'metrics_{form}.json')
            run(f'{n}. {task}: testing the {form} model with tools/test.py',
                [py, 'tools/test.py', cfg_path, ckpt_path, '--work-dir',
                 osp.join(task_dir, f'test_{form}'), '--metrics-json', out],
                osp.join(work, f'{task}_test_{form}.log'))
            with open(out) as f:
                metrics[form] = json.load(f)[spec['metric']]
        rows.append(measure_task(n, task, ckpt, metrics, work))
    table = results_table(rows)
    with open(osp.join(work, 'demo_results.md'), 'w') as f:
        f.write(table + '\n')
    print('\n' + table)
    print(f'\n[demo] done in {(time.time() - start) / 60:.1f} min; table saved to '
          f'{osp.join(args.work_dir, "demo_results.md")}')


if __name__ == '__main__':
    main()
