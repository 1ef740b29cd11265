"""Fold a trained model offline: ``python tools/fold.py CONFIG CHECKPOINT OUT_DIR``.

Writes ``OUT_DIR/deploy.pth`` (folded weights) and ``OUT_DIR/deploy_config.py``, exactly as
:class:`mmreparam.FoldHook` does after training, and reports the fold error. The pair is the
upstream model (mmdet's / mmseg's / mmpretrain's classes, no mmreparam type) where every
mmreparam part has an upstream class, else the config with ``deploy=True`` backbones
(``--deploy-form mmreparam`` always writes that one). ``--fuse-bn`` also fuses the folded
model's BN pairs and wraps that config in ``mmreparam.FusedBN``. The deploy pair
runs with the unmodified upstream test tools:
``python tools/test.py OUT_DIR/deploy_config.py OUT_DIR/deploy.pth``.
"""
import argparse
import copy
import os
import sys
import time

import torch
from mmengine.config import DictAction

from mmreparam.errors import FoldFailed, FoldMismatch
from mmreparam.utils import describe_error


def parse_args(argv=None):
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
    parser.add_argument('--max-rel-error', type=float, default=1e-4,
                        help='largest relative fold error accepted (default: 1e-4); above '
                        'it the files are written and the tool exits with 1')
    parser.add_argument('--deploy-form', choices=('upstream', 'mmreparam'),
                        default='upstream',
                        help="'upstream' (default): write the upstream model's config and "
                        'weights (no mmreparam type) where every mmreparam part has an '
                        "upstream class, else mmreparam's form; 'mmreparam': always "
                        "mmreparam's form (deploy=True backbones)")
    parser.add_argument('--fuse-bn', action='store_true',
                        help='also fuse the conv / linear -> BN and BN -> unpadded conv / '
                        'linear pairs of the folded model (found by '
                        'running it on the first test batch); the deploy config is then '
                        "mmreparam's mmreparam.FusedBN wrapper of the deploy model, since its "
                        'keys no longer match the upstream class')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, key=value (as in the upstream tools)')
    return parser.parse_args(argv)


def first_test_batch(cfg):
    """``('a test batch', batch)``: the first batch of the config's test dataloader."""
    from mmengine.runner import Runner
    return 'a test batch', next(iter(Runner.build_dataloader(cfg.test_dataloader)))


def run(args):
    """The tool's body: check the paths, build, load, fold, check, write."""
    from mmreparam.cli.model import build_model, check_paths, load_config, load_weights
    check_paths(args.config, args.checkpoint, args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    if not os.access(args.out_dir, os.W_OK):
        raise PermissionError(f'cannot write to output directory {args.out_dir!r}')

    import mmreparam
    from mmreparam.apis.deploy import export_deploy
    from mmreparam.apis.fold_check import check_fold, fold_check_messages, fold_error_detail
    cfg = load_config(args.config, args.cfg_options)
    model = build_model(cfg)
    load_weights(model, args.checkpoint)
    model.eval()
    start = time.perf_counter()
    try:
        folded = mmreparam.fold(model, strict=True)  # a deploy file is folded throughout
    except Exception as exc:
        raise FoldFailed(f'folding the model failed ({describe_error(exc)}); nothing was written')
    seconds = time.perf_counter() - start
    load_batch, pair = (lambda: first_test_batch(cfg)), None
    if args.fuse_bn:
        try:
            batch = first_test_batch(cfg)
        except Exception as exc:
            raise ValueError('--fuse-bn runs the model on the first test batch to find its '
                             f'conv -> BN pairs, and it could not be loaded '
                             f'({describe_error(exc)}); nothing was written') from None
        load_batch = lambda: batch  # noqa: E731 - the check runs on the batch fused with
        folded, pair = fuse_bn_deploy(folded, cfg, args.deploy_form, batch[1])
    fold_check, err = check_fold(model, folded, load_batch, args.max_rel_error,
                                 fallback_shape=args.shape)
    params = sum(p.numel() for p in model.parameters())
    params_folded = sum(p.numel() for p in folded.parameters())
    paths = export_deploy(folded, cfg, args.out_dir,
                          meta=dict(source=os.path.abspath(args.checkpoint), fold_error=err,
                                    fold_check=fold_check),
                          deploy_form=args.deploy_form, pair=pair)
    print(f'folded in {seconds:.2f} s: {params / 1e6:.2f}M -> {params_folded / 1e6:.2f}M '
          'parameters')
    for _, message in fold_check_messages(fold_check, err)[:1]:  # the failure: below
        note = fold_check.get('reason') if err is not None else None
        print(message + (f' ({note})' if note else ''))
    print('wrote ' + ' and '.join(p for p in (paths['checkpoint'], paths['config']) if p)
          + (' as the upstream model, which runs without mmreparam' if paths['form'] ==
             'upstream' else " in mmreparam's form, which needs mmreparam to run")
          + f' ({paths["why"]})')
    if args.onnx:
        export_backbone_onnx(folded, args.out_dir, args.shape)
    if fold_check['status'] == 'failed':
        detail = fold_error_detail(err, args.max_rel_error)
        raise FoldMismatch(
            f'fold error {err["max_rel"]:.3g} on {fold_check["measured_on"]} is above '
            f'--max-rel-error {args.max_rel_error:g}' + (f' ({detail})' if detail else '')
            + ': the folded model does not compute what the trained one computes (the files '
            'are written, marked fold_check=failed, for inspection)')


def fuse_bn_deploy(folded, cfg, deploy_form, batch):
    """``--fuse-bn``: the deploy model (upstream or mmreparam's form, built from its config
    and loaded with its weights) with its BN pairs fused (conv / linear -> BN, BN -> layer)
    (:func:`mmreparam.apis.fuse_pairs.fuse_conv_bn_pairs`, found by running it on ``batch``),
    and its deploy pair: the config wraps the model's in ``mmreparam.FusedBN`` with the
    fused pairs, the state_dict is the fused model's. The pairs that cannot be fused are
    named on one line; they stay exact.

    Returns:
        tuple[nn.Module, dict]: The fused model and the pair for ``export_deploy``.
    """
    from mmengine.config import Config

    from mmreparam.apis.deploy import deploy_pair
    from mmreparam.apis.fuse_pairs import describe_pair, fuse_conv_bn_pairs, unfused_pairs
    from mmreparam.apis.pairs import find_conv_bn_pairs
    from mmreparam.cli.model import build_model
    pair = deploy_pair(folded, cfg, deploy_form)
    if pair['config'] is None:
        raise ValueError('--fuse-bn needs a config with a model dict')
    model = build_model(pair['config'])
    model.load_state_dict(pair['state_dict'])
    model.eval()
    data = model.data_preprocessor(copy.deepcopy(batch), False)
    pairs = find_conv_bn_pairs(model, dict(inputs=data['inputs'],
                                           data_samples=data.get('data_samples'),
                                           mode='tensor'), more=True)
    fused = fuse_conv_bn_pairs(model, pairs)
    left = unfused_pairs(pairs, fused)
    print(f'fused {len(fused)} BN pair(s)' + (
        f'; left {len(left)} unfused: ' + '; '.join(map(describe_pair, left)) if left else ''))
    config = Config(pair['config'].to_dict(), filename=pair['config'].filename)
    config.model = dict(type='mmreparam.FusedBN', model=pair['config'].model.to_dict(),
                        pairs=[[p.conv, p.norm] for p in fused])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    why = f'{pair["form"]} form with {len(fused)} BN pairs fused (--fuse-bn)'
    return model, dict(config=config, state_dict=state, form='mmreparam', why=why)


def main(argv=None) -> int:
    """Entry point; returns the exit status (1 with one ``error:`` line on failure)."""
    from mmreparam.checkpoint import CheckpointError
    from mmreparam.cli import run_tool
    return run_tool('tools/fold.py', run, parse_args(argv),
                    errors=(CheckpointError, FoldFailed, FoldMismatch, OSError, ValueError,
                            KeyError, TypeError))


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
    sys.exit(main())
