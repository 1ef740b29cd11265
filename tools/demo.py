"""The demo (``make demo``): train, fold and test an OREPA-R50 detector and segmentor on CPU.

Steps, each through the real tools: generate the synthetic data sets
(``tools/generate_data.py``); train an OREPA-R50 Faster R-CNN (mmdet) and an OREPA-R50-D8
PSPNet (mmseg) with ``tools/train.py`` — :class:`mmreparam.FoldHook` writes ``deploy.pth``
and ``deploy_config.py`` at the end; test the train-time checkpoint and the folded one with
``tools/test.py``; then print (and save) a table of the metrics before and after the fold,
the parameter counts and the CPU latency of both forms.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = {
    'det': dict(config='configs/demo/faster-rcnn_orepa-r50_fpn_200i_synthetic.py',
                metric='coco/bbox_mAP',
                label='Faster R-CNN, OREPA-R50 half width (mmdet): bbox mAP'),
    'seg': dict(config='configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py', metric='mIoU',
                label='PSPNet, OREPA-R50-D8 half width (mmseg): mIoU (%)'),
}


def run(step: str, cmd: list, log_path: str) -> None:
    """Run a tool, keep its whole log, show its progress lines; stop on failure."""
    print(f'[demo] {step}', flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            if 'Iter(train)' in line or 'Iter(test)' in line or 'fold error' in line:
                print('        ' + line.split(' - INFO - ')[-1].rstrip()[:150], flush=True)
        if proc.wait() != 0:
            sys.exit(f'[demo] {step} failed (exit {proc.returncode}); see {log_path}')


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


def measure(config: str, checkpoint: str) -> dict:
    """Parameters and latency of the train-time model and its fold, on one val batch."""
    import copy

    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmreparam
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    from fold import build_model, load_weights
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.test_dataloader.dataset.data_root = osp.join(ROOT, cfg.test_dataloader.dataset.data_root)
    model = build_model(cfg)
    load_weights(model, checkpoint)
    model.eval()
    folded = mmreparam.fold(model)
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batch = model.data_preprocessor(copy.deepcopy(next(iter(loader))), False)
    inputs = dict(inputs=batch['inputs'][:1], data_samples=batch['data_samples'][:1],
                  mode='tensor')
    return dict(params=sum(p.numel() for p in model.parameters()),
                params_folded=sum(p.numel() for p in folded.parameters()),
                latency=latency(model, inputs), latency_folded=latency(folded, inputs))


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
        print(f'[demo] {n}. {task}: measuring parameters and latency', flush=True)
        stats = measure(spec['config'], ckpt)
        meta = torch.load(osp.join(task_dir, 'deploy.pth'), map_location='cpu',
                          weights_only=True)['meta']
        rows.append((spec['label'], metrics, stats, meta.get('fold_error') or {}))

    lines = [
        '| model | metric, train-time | metric, folded | fold error (max rel) | '
        'params train-time / folded | CPU latency train-time / folded (1 image) |',
        '|---|---|---|---|---|---|'
    ]
    for label, metrics, stats, err in rows:
        lines.append(
            f'| {label} | {metrics["train-time"]:.3f} | {metrics["folded"]:.3f} | '
            f'{err.get("max_rel", float("nan")):.2g} | '
            f'{stats["params"] / 1e6:.1f}M / {stats["params_folded"] / 1e6:.1f}M | '
            f'{stats["latency"] * 1e3:.0f} ms / {stats["latency_folded"] * 1e3:.0f} ms |')
    table = '\n'.join(lines)
    with open(osp.join(work, 'demo_results.md'), 'w') as f:
        f.write(table + '\n')
    print('\n' + table)
    print(f'\n[demo] done in {(time.time() - start) / 60:.1f} min; table saved to '
          f'{osp.join(args.work_dir, "demo_results.md")}')


if __name__ == '__main__':
    main()
