"""Fold a trained model offline: ``python tools/fold.py CONFIG CHECKPOINT OUT_DIR``.

Writes ``OUT_DIR/deploy.pth`` (folded weights) and ``OUT_DIR/deploy_config.py`` (the config
with ``deploy=True`` backbones), exactly as :class:`mmreparam.FoldHook` does after training,
and reports the fold error. The deploy pair runs with the unmodified upstream test tools:
``python tools/test.py OUT_DIR/deploy_config.py OUT_DIR/deploy.pth``.
"""
import argparse
import copy
import os
import sys
import time

import torch
from mmengine.config import Config, DictAction


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='training config file')
    parser.add_argument('checkpoint', help='checkpoint of that config (train form)')
    parser.add_argument('out_dir', help='where deploy.pth and deploy_config.py go')
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 224),
                        help='input size for the fold check when no dataset batch can be '
                        'loaded (default: 224 224)')
    parser.add_argument('--onnx', action='store_true',
                        help='also export the folded backbone to OUT_DIR/deploy_backbone.onnx, '
                        'check it with onnxruntime and print its op counts')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, key=value (as in the upstream tools)')
    return parser.parse_args()


def build_model(cfg):
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    from mmreparam.apis.toolbox import detect_toolbox
    toolbox = detect_toolbox(cfg)
    init_default_scope(toolbox)
    return models_registry(toolbox).build(cfg.model)


def load_weights(model, path):
    from mmreparam.checkpoint import CheckpointError, safe_load
    ckpt = safe_load(path)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path!r} holds no state_dict')
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise CheckpointError(
            f'{path!r} does not match the model of the config: {len(missing)} missing keys '
            f'(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')


def fold_check(cfg, model, folded, shape):
    """Fold error on one test batch if the dataset is there, else on the backbone."""
    from mmreparam import fold_error
    try:
        from mmengine.runner import Runner
        loader = Runner.build_dataloader(cfg.test_dataloader)
        batch = model.data_preprocessor(copy.deepcopy(next(iter(loader))), False)
        return 'a test batch', fold_error(model, folded, dict(
            inputs=batch['inputs'], data_samples=batch.get('data_samples'), mode='tensor'))
    except Exception:  # no dataset here: check the backbone on a random input
        x = torch.randn(1, 3, *shape)
        return f'the backbone on a random {shape[0]}x{shape[1]} input', fold_error(
            model.backbone, folded.backbone, x)


def main():
    args = parse_args()
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if not os.path.isfile(path):
            sys.exit(f'tools/fold.py: error: {what} {path!r} does not exist')
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        sys.exit(f'tools/fold.py: error: output directory {args.out_dir!r} is a file')
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if not os.access(args.out_dir, os.W_OK):
            raise PermissionError(f'cannot write to {args.out_dir!r}')
    except OSError as err:
        sys.exit(f'tools/fold.py: error: output directory: {err}')

    import mmreparam
    from mmreparam.apis.deploy import export_deploy
    from mmreparam.checkpoint import CheckpointError
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        model = build_model(cfg)
        load_weights(model, args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f'tools/fold.py: error: {err}')
    model.eval()
    start = time.perf_counter()
    folded = mmreparam.fold(model)
    seconds = time.perf_counter() - start
    where, err = fold_check(cfg, model, folded, args.shape)
    params = sum(p.numel() for p in model.parameters())
    params_folded = sum(p.numel() for p in folded.parameters())
    paths = export_deploy(folded, cfg, args.out_dir,
                          meta=dict(source=os.path.abspath(args.checkpoint), fold_error=err))
    print(f'folded in {seconds:.2f} s: {params / 1e6:.2f}M -> {params_folded / 1e6:.2f}M '
          f'parameters; fold error on {where}: max abs {err["max_abs"]:.3g}, '
          f'max rel {err["max_rel"]:.3g}')
    print(f'wrote {paths["checkpoint"]} and {paths["config"]}')
    if args.onnx:
        export_backbone_onnx(folded, args.out_dir, args.shape)


def export_backbone_onnx(folded, out_dir, shape):
    """Export the folded backbone, check it with onnxruntime, print its op census."""
    from mmreparam.apis.onnx import export_onnx, onnx_op_counts, onnxruntime_error
    backbone = getattr(folded, 'backbone', folded)
    x = torch.randn(1, 3, *shape)
    path = export_onnx(backbone, x, os.path.join(out_dir, 'deploy_backbone.onnx'))
    err = onnxruntime_error(path, backbone, x)
    ops = ', '.join(f'{op} {n}' for op, n in onnx_op_counts(path).items())
    print(f'wrote {path}: onnxruntime vs PyTorch max rel error {err:.2g}; ops: {ops}')


if __name__ == '__main__':
    main()
