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
import json
import os
import os.path as osp
import sys
import time

import torch

from mmreparam.benchmark.demo import measure, results_table
from mmreparam.cli.steps import output_to, run_step

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
    run_step(step, cmd, log_path, cwd=ROOT, prefix='[demo]')


def measure_task(n: int, task: str, ckpt: str, metrics: dict, work: str) -> tuple:
    """Step ``n`` of a task after its tests: :func:`measure` (its output kept in
    ``WORK/TASK_measure.log``); returns the task's row for :func:`results_table`."""
    spec = TASKS[task]
    print(f'[demo] {n}. {task}: measuring parameters and latency; int8 quantization of '
          f'the folded backbone (+ neck), {CALIB_IMAGES} calibration images', flush=True)
    int8_dir = osp.join(work, task, 'int8')
    with output_to(osp.join(work, f'{task}_measure.log')):
        stats = measure(spec['config'], ckpt, int8_dir, ROOT, CALIB_IMAGES, EVAL_IMAGES)
    int8, metric = stats['int8'], spec['metric']
    print(f'        int8: {metric} {int8["int8"]["metrics"][metric]:.3f} (float ONNX '
          f'{int8["float"]["metrics"][metric]:.3f}); {int8["float"]["size_bytes"] / 2**20:.1f}'
          f' -> {int8["int8"]["size_bytes"] / 2**20:.1f} MiB; '
          f'{osp.relpath(osp.join(int8_dir, "report.json"), ROOT)}', flush=True)
    meta = torch.load(osp.join(work, task, 'deploy.pth'), map_location='cpu',
                      weights_only=True)['meta']
    return spec['label'], metric, metrics, stats, meta.get('fold_error') or {}


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
