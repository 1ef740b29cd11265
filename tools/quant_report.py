"""Which block quantizes best: ``python tools/quant_report.py [--work-dir DIR] [--iters N]``.

Trains the same model with each block choice the same way, folds it and quantizes it to
int8 the same way, then tabulates float vs int8. Each step runs a real tool:

1. ``tools/generate_data.py``: the synthetic Cityscapes-format shapes set of ``make demo``
   (with more val images, so that the metric and the held-back error rest on more pixels);
2. per variant, ``tools/train.py`` on a config written from the demo's PSPNet
   (``configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py``): same seed, same data order,
   same schedule (``--iters`` SGD steps); :class:`mmreparam.FoldHook` folds at the end;
3. per variant, ``tools/quantize.py`` on the folded model (``deploy_config.py`` +
   ``deploy.pth``): onnxruntime static QDQ int8, per-channel weights, MinMax calibration on
   the first ``--calib`` val images, error on the next ``--eval``, mIoU of the float and the
   int8 backbone under the same PyTorch heads on all val images.

Variants (``--variants``): :data:`mmreparam.benchmark.quant_report.VARIANTS`.

Results: ``WORK_DIR/quant_report.md`` (the table) and ``WORK_DIR/quant_report.json``; each
variant's config in ``WORK_DIR/configs/``, its logs, checkpoints and ``int8/report.json``
under ``WORK_DIR/VARIANT/``. A variant
whose ``int8/report.json`` was made from the same config is not run again (``--force``
runs it again).
"""
import argparse
import functools
import json
import os
import os.path as osp
import sys
import time

from mmengine.config import DictAction

from mmreparam.benchmark import quant_report as qr

# weight_spread: for callers of this module (the tests)
from mmreparam.benchmark.quant_report import VARIANTS, weight_spread  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CONFIG = 'configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default='work_dirs/quant_report')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS),
                        choices=list(VARIANTS), metavar='VARIANT',
                        help=f'which variants (default: all of {", ".join(VARIANTS)})')
    parser.add_argument('--iters', type=int, default=300,
                        help='training iterations, the same for every variant (default: 300)')
    parser.add_argument('--num-val', type=int, default=48,
                        help='val images generated (default: 48)')
    parser.add_argument('--calib', type=int, default=16,
                        help='calibration images, the first of the val set (default: 16)')
    parser.add_argument('--eval', type=int, default=16,
                        help='held-back images for the int8 vs float error (default: 16)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override keys of every variant\'s config, key=value (e.g. '
                        'model.backbone.base_channels=16); the heads follow the backbone')
    parser.add_argument('--force', action='store_true',
                        help='run every variant again, even those with a report')
    return parser.parse_args(argv)


def check_args(args) -> None:
    """One clear error for counts that cannot work."""
    if args.iters < 10:
        raise ValueError(f'--iters must be at least 10, got {args.iters}')
    for option, value in (('--calib', args.calib), ('--eval', args.eval)):
        if value < 1:
            raise ValueError(f'{option} must be at least 1, got {value}')
    if args.calib + args.eval > args.num_val:
        raise ValueError(f'--calib {args.calib} + --eval {args.eval} images need --num-val '
                         f'>= {args.calib + args.eval}, got {args.num_val}')


@functools.lru_cache(maxsize=None)
def base_config():
    """The demo's PSPNet config, parsed once (resolving its ``mmseg::`` bases takes seconds)."""
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, BASE_CONFIG))


def variant_config(name: str, iters: int, data_root: str, cfg_options=None):
    """:func:`mmreparam.benchmark.quant_report.variant_config` of the demo's PSPNet."""
    return qr.variant_config(base_config(), name, iters, data_root, cfg_options)


def run_variant(name: str, args, work: str, data_root: str) -> dict:
    """Train, fold (FoldHook) and quantize one variant; its quantization report. A report
    made from the same config (and the same quantization options) is kept unless
    ``--force``."""
    from mmreparam.cli.steps import run_step
    out = osp.join(work, name)
    # not in ``out``: the runner dumps its own version of the config there, same file name
    config = osp.join(work, 'configs', f'{name}.py')
    report_path = osp.join(out, 'int8', 'report.json')
    text = variant_config(name, args.iters, data_root, args.cfg_options).pretty_text
    text += (f'# quant_report: --num-val {args.num_val} --calib {args.calib} '
             f'--eval {args.eval}\n')
    if not args.force and osp.isfile(report_path) and _read(config) == text:
        print(f'[quant_report] {name}: kept {osp.relpath(report_path, ROOT)} (same config; '
              '--force redoes it)', flush=True)
    else:
        os.makedirs(out, exist_ok=True)
        os.makedirs(osp.dirname(config), exist_ok=True)
        if osp.exists(report_path):
            os.remove(report_path)  # a failed run below must not leave the old one as new
        with open(config, 'w') as f:
            f.write(text)
        py = sys.executable
        run_step(f'{name}: training {args.iters} iterations (FoldHook folds at the end)',
                 [py, 'tools/train.py', config, '--work-dir', out],
                 osp.join(out, 'train.log'), cwd=ROOT, prefix='[quant_report]')
        run_step(f'{name}: int8 quantization of the folded model',
                 [py, 'tools/quantize.py', osp.join(out, 'deploy_config.py'),
                  osp.join(out, 'deploy.pth'), osp.join(out, 'int8'), '--calib',
                  str(args.calib), '--eval', str(args.eval)],
                 osp.join(out, 'quantize.log'), cwd=ROOT, prefix='[quant_report]')
    with open(report_path) as f:
        return json.load(f)


def _read(path: str):
    """The text of ``path``, None if there is no such file."""
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def run(args) -> None:
    """The tool's body: data, then every variant, then the table."""
    from mmreparam.cli.steps import run_step
    check_args(args)
    work = osp.join(ROOT, args.work_dir)
    os.makedirs(work, exist_ok=True)
    start = time.time()
    data = osp.join(work, 'data')
    run_step(f'generating the synthetic data ({args.num_val} val images)',
             [sys.executable, 'tools/generate_data.py', '--root', data, '--num-val',
              str(args.num_val)], osp.join(work, 'generate_data.log'), cwd=ROOT,
             prefix='[quant_report]')
    rows = [qr.summarize(name, run_variant(name, args, work, osp.join(data, 'seg')), work)
            for name in args.variants]
    text = qr.table(rows, args)
    with open(osp.join(work, 'quant_report.md'), 'w') as f:
        f.write(text + '\n')
    with open(osp.join(work, 'quant_report.json'), 'w') as f:
        json.dump(dict(settings=vars(args), rows=rows), f, indent=1)
    print('\n' + text)
    print(f'\n[quant_report] done in {(time.time() - start) / 60:.1f} min; '
          f'{osp.join(args.work_dir, "quant_report.md")}')


def main(argv=None) -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on bad input)."""
    from mmreparam.cli import run_tool
    return run_tool('tools/quant_report.py', run, parse_args(argv), errors=(ValueError,))


if __name__ == '__main__':
    sys.exit(main())
