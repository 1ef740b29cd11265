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

Variants (``--variants``):

- ``r50-base``, ``r50-dbb``, ``r50-orepa``, ``r50-repvgg``, ``r50-qarepvgg``: the demo's
  ResNet-50-D8 (half width, as in the demo) with ``reparam`` base / DBB / OREPA / RepVGG /
  QARepVGG; trained with the demo's SGD recipe (gradient clipping at 10 included);
- ``repvgg-a0``, ``qarepvgg-a0``, ``repopt-vgg-a0``: VGG-style A0 backbones at full width,
  made dilated (strides 2, 2, 1, 1; dilations 1, 1, 2, 4) for the same PSPNet heads: RepVGG
  blocks, QARepVGG blocks, and RepOpt-VGG (the plain target model trained with
  :class:`mmreparam.engine.RepOptimizerConstructor`, the constant scales of the paper's
  "same as HS initialization" ablation: a hyper-search would need its own training run).
  All three without gradient clipping, which breaks the RepOptimizer's equivalence.

Results: ``WORK_DIR/quant_report.md`` (the table) and ``WORK_DIR/quant_report.json``; each
variant's config in ``WORK_DIR/configs/``, its logs, checkpoints and ``int8/report.json``
under ``WORK_DIR/VARIANT/``. A variant
whose ``int8/report.json`` was made from the same config is not run again (``--force``
runs it again).
"""
import argparse
import copy
import functools
import json
import os
import os.path as osp
import sys
import time

from mmengine.config import DictAction

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CONFIG = 'configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py'
METRIC = 'mIoU'
RESNET = dict(family='ResNet-50-D8, half width, SGD + clip_grad 10')
VGG = dict(family='A0, dilated, SGD without clip_grad')
# name -> (family, backbone keys replaced in the demo config's backbone, optimizer constructor)
VARIANTS = {
    'r50-base': (RESNET, dict(reparam='base'), None),
    'r50-dbb': (RESNET, dict(reparam='DBB'), None),
    'r50-orepa': (RESNET, dict(reparam='OREPA'), None),
    'r50-repvgg': (RESNET, dict(reparam='RepVGG'), None),
    'r50-qarepvgg': (RESNET, dict(reparam='QARepVGG'), None),
    'repvgg-a0': (VGG, dict(type='mmreparam.RepVGG', arch='A0', reparam='RepVGG'), None),
    'qarepvgg-a0': (VGG, dict(type='mmreparam.RepVGG', arch='A0', reparam='QARepVGG'), None),
    'repopt-vgg-a0': (VGG, dict(type='mmreparam.RepOptVGG', arch='A0', mode='target',
                                scales='const'), 'mmreparam.RepOptimizerConstructor'),
}
# D8 like the ResNet; all four stages out, as the heads' in_index (2: auxiliary, 3: decode)
VGG_GEOMETRY = dict(strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(0, 1, 2, 3))


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


def stage_channels(backbone_cfg: dict) -> tuple:
    """Output channels of the backbone's ``out_indices`` (built once, on a tiny input)."""
    import torch
    from mmengine.registry import init_default_scope

    import mmreparam  # noqa: F401  (registers the backbones)
    from mmreparam.registry import MODELS
    init_default_scope('mmseg')
    backbone = MODELS.build(dict(backbone_cfg)).eval()
    with torch.no_grad():
        outs = backbone(torch.zeros(1, 3, 32, 32))
    return tuple(out.shape[1] for out in outs)


@functools.lru_cache(maxsize=None)
def base_config():
    """The demo's PSPNet config, parsed once (resolving its ``mmseg::`` bases takes seconds)."""
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, BASE_CONFIG))


def variant_config(name: str, iters: int, data_root: str, cfg_options=None):
    """The demo's PSPNet config with variant ``name``'s backbone and ``iters`` steps, then
    ``cfg_options`` merged in; the heads' input channels follow the backbone's."""
    from mmengine.config import ConfigDict
    _, backbone, constructor = VARIANTS[name]
    cfg = copy.deepcopy(base_config())
    if 'type' in backbone:  # a VGG-style backbone replaces the ResNet
        cfg.model.backbone = ConfigDict(dict(backbone, **VGG_GEOMETRY,
                                             norm_cfg=cfg.model.backbone.norm_cfg))
        cfg.optim_wrapper.pop('clip_grad', None)
    else:
        cfg.model.backbone.update(backbone)
    if constructor:
        cfg.optim_wrapper.constructor = constructor
    cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = iters
    cfg.default_hooks.checkpoint.interval = iters
    warmup, poly = cfg.param_scheduler  # the demo's: linear warm-up, then poly decay
    warmup.end = poly.begin = min(warmup.end, iters // 2)  # runs shorter than the demo's
    poly.end = iters
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    channels = stage_channels(cfg.model.backbone)
    for head in ('decode_head', 'auxiliary_head'):
        cfg.model[head].in_channels = channels[cfg.model[head].in_index]
    return cfg


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


def weight_spread(deploy_ckpt: str) -> float:
    """Median over the folded convs of the mean per-output-channel ``max|w| / std(w)``: how
    far a channel's largest weight lies from its bulk, i.e. how much per-channel int8
    resolution the bulk of the weights gets (a Gaussian gives about 3 to 4)."""
    import statistics

    import torch
    state = torch.load(deploy_ckpt, map_location='cpu', weights_only=True)['state_dict']
    ratios = []
    for key, weight in state.items():
        if key.startswith('backbone.') and key.endswith('weight') and weight.dim() == 4 \
                and weight[0].numel() > 1:
            flat = weight.flatten(1).double()
            ratios.append((flat.abs().amax(1) / flat.std(1).clamp_min(1e-12)).mean().item())
    return statistics.median(ratios)


def summarize(name: str, report: dict, work: str) -> dict:
    """The table row of a variant from its quantization report and checkpoints."""
    import torch
    deploy = osp.join(work, name, 'deploy.pth')
    meta = torch.load(deploy, map_location='cpu', weights_only=True)['meta']
    outputs = report['outputs']
    return dict(
        variant=name, family=VARIANTS[name][0]['family'],
        fold_error=(meta.get('fold_error') or {}).get('max_rel', float('nan')),
        float=report['float']['metrics'][METRIC], int8=report['int8']['metrics'][METRIC],
        cosine_min=min(o['cosine_min'] for o in outputs),
        rel_error=max(o['rel_error'] for o in outputs),
        weight_spread=weight_spread(deploy),
        size_mib=report['float']['size_bytes'] / 2**20,
        int8_mib=report['int8']['size_bytes'] / 2**20)


def table(rows, args) -> str:
    """The markdown table of :func:`summarize` rows, with what was measured and how."""
    lines = [
        f'PSPNet on the synthetic shapes set, {args.iters} iterations per variant (same seed, '
        f'same schedule), folded, int8 (onnxruntime QDQ, per-channel weights, MinMax on '
        f'{args.calib} images); mIoU % on {args.num_val} val images with the PyTorch heads; '
        f'error on {args.eval} held-back images.', '',
        '| backbone | variant | fold error (max rel) | mIoU float | mIoU int8 | int8 - float '
        '| worst cosine | largest rel. error | weight max/std | MiB float -> int8 |',
        '|---|---|---|---|---|---|---|---|---|---|'
    ]
    for r in rows:
        lines.append(
            f'| {r["family"]} | {r["variant"]} | {r["fold_error"]:.2g} | {r["float"]:.2f} | '
            f'{r["int8"]:.2f} | {r["int8"] - r["float"]:+.2f} | {r["cosine_min"]:.4f} | '
            f'{r["rel_error"]:.3f} | {r["weight_spread"]:.1f} | '
            f'{r["size_mib"]:.1f} -> {r["int8_mib"]:.1f} |')
    return '\n'.join(lines)


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
    rows = [summarize(name, run_variant(name, args, work, osp.join(data, 'seg')), work)
            for name in args.variants]
    text = table(rows, args)
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
