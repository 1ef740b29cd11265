"""Quantize a trained model to int8: ``python tools/quantize.py CONFIG CHECKPOINT OUT_DIR``.

Builds the model of the config, loads the checkpoint (train-time or folded), folds it and
quantizes its backbone (and neck, if any) with onnxruntime's static post-training quantization,
calibrated on ``--calib`` images of the config's val (else test) dataloader (by default up to
32, as many as the data set allows besides the ``--eval`` ones). Writes
``OUT_DIR/model.onnx`` (float), ``OUT_DIR/model_int8.onnx`` and ``OUT_DIR/report.json``:
int8 vs float error and cosine similarity on ``--eval`` held-back images, file sizes,
onnxruntime CPU latency, and the metric of both through the config's evaluator (the heads
stay in PyTorch). See :func:`mmreparam.apis.quantize.quantize_int8`.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import DictAction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='config file (train-time or deploy_config.py)')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('out_dir', help='where model.onnx, model_int8.onnx and report.json go')
    parser.add_argument('--calib', type=int, default=None,
                        help='number of calibration images, the first of the data set '
                        '(default: 32, or as many as the data set allows besides --eval)')
    parser.add_argument('--eval', type=int, default=None,
                        help='number of held-back images (after the calibration ones) for the '
                        'int8 vs float error (default: 8, at most a quarter of the data set)')
    parser.add_argument('--activations', choices=('uint8', 'int8'), default='uint8',
                        help='activation type (default: uint8, the fast one on x86 CPUs; int8 '
                        'for ARM; weights are always int8)')
    parser.add_argument('--no-metric', action='store_true',
                        help="skip the metric through the config's evaluator")
    parser.add_argument('--latency-runs', type=int, default=10,
                        help='timed onnxruntime runs per model (default: 10)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, key=value (as in the upstream tools)')
    return parser.parse_args(argv)


def run(args):
    """The tool's body: check the paths, build, load, quantize (which folds and writes)."""
    from mmreparam.cli.model import build_model, check_paths, load_config, load_weights
    check_paths(args.config, args.checkpoint, args.out_dir)
    for option, value in (('--calib', args.calib), ('--eval', args.eval),
                          ('--latency-runs', args.latency_runs)):
        if value is not None and value < 1:
            raise ValueError(f'{option} must be at least 1, got {value}')

    from mmreparam.apis.quantize import quantize_int8
    cfg = load_config(args.config, args.cfg_options)
    model = build_model(cfg)
    load_weights(model, args.checkpoint)
    model.eval()
    report = quantize_int8(model, cfg, args.out_dir, calib_images=args.calib,
                           eval_images=args.eval, activation_type=args.activations,
                           evaluate=not args.no_metric, latency_runs=args.latency_runs)
    worst = min(out['cosine_min'] for out in report['outputs'])
    print(f'wrote {osp.join(args.out_dir, "model_int8.onnx")} '
          f'({report["int8"]["size_bytes"] / 2**20:.2f} MiB, float '
          f'{report["float"]["size_bytes"] / 2**20:.2f} MiB) and report.json; '
          f'worst held-back cosine int8 vs float {worst:.4f}')


def main(argv=None) -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on failure)."""
    import mmreparam  # noqa: F401  (registry scope, checkpoint allow-list)
    from mmreparam.checkpoint import CheckpointError
    from mmreparam.cli import run_tool
    return run_tool('tools/quantize.py', run, parse_args(argv),
                    errors=(CheckpointError, OSError, ValueError, KeyError, TypeError,
                            ImportError))


if __name__ == '__main__':
    sys.exit(main())
