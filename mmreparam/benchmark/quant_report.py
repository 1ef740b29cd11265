"""Which block quantizes best (``tools/quant_report.py``): the variants, their configs, and
the table of float vs int8.

Every variant is the demo's PSPNet (``configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py``)
with another backbone, trained, folded and quantized the same way (:data:`VARIANTS`):

- ``r50-base``, ``r50-dbb``, ``r50-orepa``, ``r50-repvgg``, ``r50-qarepvgg``: the demo's
  ResNet-50-D8 (half width, as in the demo) with ``reparam`` base / DBB / OREPA / RepVGG /
  QARepVGG; trained with the demo's SGD recipe (gradient clipping at 10 included);
- ``repvgg-a0``, ``qarepvgg-a0``, ``repopt-vgg-a0``: VGG-style A0 backbones at full width,
  made dilated (strides 2, 2, 1, 1; dilations 1, 1, 2, 4) for the same PSPNet heads: RepVGG
  blocks, QARepVGG blocks, and RepOpt-VGG (the plain target model trained with
  :class:`mmreparam.engine.RepOptimizerConstructor`, the constant scales of the paper's
  "same as HS initialization" ablation: a hyper-search would need its own training run).
  All three without gradient clipping, which breaks the RepOptimizer's equivalence.
"""
import copy
import os.path as osp
import statistics
from typing import Optional

import torch
from mmengine.config import Config, ConfigDict

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


def stage_channels(backbone_cfg: dict) -> tuple:
    """Output channels of the backbone's ``out_indices`` (built once, on a tiny input)."""
    from mmengine.registry import init_default_scope

    from ..registry import MODELS
    init_default_scope('mmseg')
    backbone = MODELS.build(dict(backbone_cfg)).eval()
    with torch.no_grad():
        outs = backbone(torch.zeros(1, 3, 32, 32))
    return tuple(out.shape[1] for out in outs)


def variant_config(base: Config, name: str, iters: int, data_root: str,
                   cfg_options: Optional[dict] = None) -> Config:
    """A variant's config.

    Args:
        base (Config): The demo's PSPNet config (not changed).
        name (str): The variant, a key of :data:`VARIANTS`.
        iters (int): Training iterations (the warm-up is shortened to half of them if
            longer).
        data_root (str): The synthetic segmentation set.
        cfg_options (dict, optional): Keys to override, merged last; the heads' input
            channels follow the backbone's.

    Returns:
        Config: ``base`` with the variant's backbone (and optimizer constructor) and
        ``iters`` steps.
    """
    _, backbone, constructor = VARIANTS[name]
    cfg = copy.deepcopy(base)
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


def weight_spread(deploy_ckpt: str) -> float:
    """Median over the folded convs of the mean per-output-channel ``max|w| / std(w)``: how
    far a channel's largest weight lies from its bulk, i.e. how much per-channel int8
    resolution the bulk of the weights gets (a Gaussian gives about 3 to 4)."""
    state = torch.load(deploy_ckpt, map_location='cpu', weights_only=True)['state_dict']
    ratios = []
    for key, weight in state.items():
        if key.startswith('backbone.') and key.endswith('weight') and weight.dim() == 4 \
                and weight[0].numel() > 1:
            flat = weight.flatten(1).double()
            ratios.append((flat.abs().amax(1) / flat.std(1).clamp_min(1e-12)).mean().item())
    return statistics.median(ratios)


def summarize(name: str, report: dict, work: str) -> dict:
    """The table row of a variant from its quantization report (``int8/report.json``) and
    its deploy checkpoint (``WORK/NAME/deploy.pth``)."""
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
    """The markdown table of :func:`summarize` rows, with what was measured and how
    (``args``: ``iters``, ``calib``, ``num_val`` and ``eval`` of the run)."""
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


__all__ = ['METRIC', 'VARIANTS', 'VGG_GEOMETRY', 'stage_channels', 'variant_config',
           'weight_spread', 'summarize', 'table']
