"""The benchmark sections: each measures one thing and reports it as its own tables.

A section is a function ``(settings) -> Report``; :data:`SECTIONS` lists them in the order
of the report. Block types come from :data:`~mmreparam.models.layers.factory.REPARAM_TYPES`
(ResNet-50 with each ``reparam``) and ``RepVGG.block_types``, so a new block type is measured
without a change here.
"""
import contextlib
import copy
import os.path as osp
import time
from typing import Any, Callable, Dict, Sequence

import torch

from .cost import bench_launches, bench_ops, bench_train, resnet50
from .report import Report, Table, fmt_time
from .settings import BenchmarkSettings
from .timing import interleaved, log, sync, timed


def bench_kernel(s: BenchmarkSettings) -> Report:
    """OREPA-R50 kernel generation, forward + backward: all its generators per layer vs
    batched by shape, and its OREPA 3x3 blocks against the literal paper equations."""
    from ..models.layers import OREPA
    from ..models.layers.orepa import BATCHED_GENERATORS, batched_kernel_generation
    from ..testing import literal_orepa_kernel, randomize_parameters
    model = resnet50('OREPA').to(s.device)
    randomize_parameters(model, ('vector', 'idconv1'), seed=0)
    blocks = [m for m in model.modules() if isinstance(m, OREPA)]
    generators = [m for m in model.modules() if isinstance(m, BATCHED_GENERATORS)]
    constants = {}

    def run(gen):
        total = sum(gen(b).square().sum() for b in blocks)
        total.backward()

    def all_generators(batched):
        model.zero_grad(set_to_none=True)
        with batched_kernel_generation(model, constants, cpu=True) if batched else \
                contextlib.nullcontext():
            total = sum(g.generate_kernel().square().sum() for g in generators)
        total.backward()

    log(f'kernel generation: all {len(generators)} generators of OREPA-ResNet-50, per '
         'layer and batched, interleaved')
    gen_stats = interleaved(dict(per_layer=lambda: all_generators(False),
                                 batched=lambda: all_generators(True)),
                            s.repeats, s.warmup, s.device)
    log(f'kernel generation: {len(blocks)} OREPA 3x3 blocks of ResNet-50, ours vs the '
         'literal paper equations (one einsum per branch), interleaved')
    stats = interleaved(dict(ours=lambda: run(lambda b: b.generate_kernel()),
                             literal=lambda: run(literal_orepa_kernel)),
                        s.repeats, s.warmup, s.device)
    with torch.no_grad():
        kernels = [(literal_orepa_kernel(b), b.generate_kernel()) for b in blocks]
        per_layer = [g.generate_kernel() for g in generators]
        with batched_kernel_generation(model, constants, cpu=True):
            batched = [g.generate_kernel() for g in generators]
    err = max(((lit - k).abs().max() / k.abs().max()).item() for lit, k in kernels)
    batch_err = max(((a - b).abs().max() / a.abs().max()).item()
                    for a, b in zip(per_layer, batched))
    literal = 'literal paper equations (one einsum per branch)'
    tables = [
        _relative_table(f'OREPA-R50 kernel generation of all its {len(generators)} generators '
                        '(forward + backward)', ['implementation', 's', 'ratio'],
                        {'per layer': gen_stats['per_layer'],
                         'batched by shape': gen_stats['batched']}, 'per layer',
                        notes=[f'Max relative difference of the kernels: {batch_err:.1e}.']),
        _relative_table(f'OREPA-R50 kernel generation of its {len(blocks)} OREPA 3x3 blocks '
                        '(forward + backward)', ['implementation', 's', 'ratio'],
                        {literal: stats['literal'], 'mmreparam': stats['ours']}, literal,
                        notes=['Max relative difference of the generated kernels: '
                               f'{err:.1e}.'])]
    return Report(tables, data=dict(stats, **gen_stats, max_rel_difference=err,
                                    batched_max_rel_difference=batch_err))


def _relative_table(title: str, columns: Sequence[str], stats: Dict[str, dict],
                    reference: str, digits: int = 2, notes: Sequence[str] = ()) -> Table:
    """Times by name, each also as a ratio to ``reference``'s."""
    table = Table(title, columns, notes=notes)
    for name, r in stats.items():
        table.add(name, fmt_time(r), f'{r["median"] / stats[reference]["median"]:.{digits}f}x')
    return table


def bench_block(s: BenchmarkSettings) -> Report:
    """One OREPA 3x3 block against ConvBN, forward + backward (256 channels, 56x56,
    batch 8)."""
    from ..models.layers import OREPA, ConvBN
    x = torch.randn(8, 256, 56, 56, device=s.device)
    blocks = dict(ConvBN=ConvBN(256, 256, 3), OREPA=OREPA(256, 256, 3))
    for block in blocks.values():
        block.to(s.device).train()
    log('block: ConvBN vs OREPA 3x3, 256 channels, 56x56, batch 8, forward + backward')
    stats = interleaved({name: (lambda b=b: b(x).sum().backward())
                         for name, b in blocks.items()}, s.repeats, s.warmup, s.device)
    return Report([_relative_table(
        'One 3x3 block, forward + backward (256 ch, 56x56, batch 8)',
        ['block', 's', 'vs ConvBN'], stats, 'ConvBN')], data=stats)


def bench_infer(s: BenchmarkSettings) -> Report:
    """Inference latency of the train-time OREPA-R50, its fold, and mmdet's ResNet-50."""
    from mmdet.models.backbones import ResNet as DetResNet

    from ..apis import fold
    batch, size = s.infer_shape
    x = torch.randn(batch, 3, size, size, device=s.device)
    train_time = resnet50('OREPA').to(s.device).eval()
    folded = fold(train_time)
    plain = DetResNet(50, out_indices=(3, )).to(s.device)
    plain.eval()
    models = {'mmdet ResNet-50': plain, 'OREPA-R50 folded': folded,
              'OREPA-R50 train-time': train_time}
    log(f'inference: mmdet ResNet-50, OREPA-R50 folded and train-time, batch {batch} at '
         f'{size}x{size}, interleaved')
    with torch.inference_mode():
        stats = interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, s.repeats,
                            s.warmup, s.device)
    return Report([_relative_table(
        f'Inference latency (batch {batch} at {size}x{size})',
        ['model', 's', 'vs mmdet ResNet-50'], stats, 'mmdet ResNet-50', digits=3,
        notes=["mmdet's ResNet-50 runs its BatchNorms as separate ops in eval mode; the "
               'folded model has them fused into its convolutions.'])], data=stats)


def _fold_cost(model: torch.nn.Module, device: str) -> dict:
    """Fold time and fold error (fp32, fp64) of a model with random BN statistics."""
    from ..apis import fold, fold_error
    model.to(device).eval()
    start = time.perf_counter()
    folded = fold(model)
    sync(device)
    seconds = time.perf_counter() - start
    x = torch.randn(2, 3, 96, 96, device=device)
    err32 = fold_error(model, folded, x)['max_rel']
    model64 = copy.deepcopy(model).double()
    err64 = fold_error(model64, fold(model64), x.double())['max_rel']
    return dict(seconds=seconds, fp32=err32, fp64=err64)


def _detector_fold_time(config: str) -> float:
    """Median time of three folds of the whole mmdet model of ``config``."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from ..apis import fold
    init_default_scope('mmdet')
    detector = MODELS.build(Config.fromfile(config).model).eval()
    return timed(lambda: fold(detector), repeats=3, warmup=0, device='cpu')['median']


def bench_fold(s: BenchmarkSettings) -> Report:
    """Fold time and fold error (fp32, fp64) of ResNet-50 with every block type and RepVGG-A0
    with each of its own, and the fold time of a whole OREPA-R50 Mask R-CNN (mmdet)."""
    from ..models.backbones import RepVGG
    from ..models.layers.factory import REPARAM_TYPES
    from ..testing import randomize_bn, randomize_parameters
    models = {f'ResNet-50 {r}': (lambda r=r: resnet50(r)) for r in REPARAM_TYPES}
    models.update({f'RepVGG-A0 {r}': (lambda r=r: RepVGG('A0', reparam=r))
                   for r in RepVGG.block_types})
    rows, notes = {}, []
    for name, make in models.items():
        log(f'fold: {name}')
        torch.manual_seed(0)
        model = randomize_bn(randomize_parameters(make(), ('vector', 'idconv1'), seed=1))
        rows[name] = _fold_cost(model, s.device)
    try:
        import mmdet  # noqa: F401
    except ImportError:
        log('fold: mmdet is not installed: no whole-detector fold time')
    else:
        log('fold: whole OREPA-R50 Mask R-CNN (mmdet)')
        seconds = _detector_fold_time(
            osp.join(s.config_dir, 'mmdet', 'mask-rcnn_orepa-r50_fpn_1x_coco.py'))
        rows['Mask R-CNN OREPA-R50 (whole model, deep copy included)'] = dict(
            seconds=seconds, fp32=None, fp64=None)
        notes.append('The whole-detector row is timed only: its re-parameterized part is the '
                     'OREPA ResNet-50 whose error is measured above.')
    table = Table('Fold time and exactness', ['model', 'fold time (s)', 'max rel error fp32',
                                              'max rel error fp64'], notes=notes)
    for name, r in rows.items():
        table.add(name, f'{r["seconds"]:.3f}',
                  *('-' if r[k] is None else f'{r[k]:.1e}' for k in ('fp32', 'fp64')))
    return Report([table], data=rows)


def _detector_train_step(config: str, data: Any, device: str) -> Callable[[], None]:
    """One training iteration (SGD) of the mmdet model of ``config`` on ``data``."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()  # as in training (default init can leave denormal activations)
    model = model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          momentum=0.9)

    def step():
        batch = model.data_preprocessor(copy.deepcopy(data), True)
        losses = model(**batch, mode='loss')
        loss = sum(v.sum() if torch.is_tensor(v) else sum(v)
                   for k, v in losses.items() if 'loss' in k)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_det(s: BenchmarkSettings) -> Report:
    """mmdet Faster R-CNN training iteration, OREPA-R50 vs R50, batch 2 at 320x320."""
    from mmdet.testing import demo_mm_inputs
    data = demo_mm_inputs(2, image_shapes=(3, 320, 320), num_classes=80)
    configs = {'R50': 'faster-rcnn_base-r50_fpn_1x_coco.py',
               'OREPA-R50': 'faster-rcnn_orepa-r50_fpn_1x_coco.py'}
    steps = {name: _detector_train_step(osp.join(s.config_dir, 'mmdet', cfg), data, s.device)
             for name, cfg in configs.items()}
    log('det: Faster R-CNN R50 and OREPA-R50 training iterations, batch 2 at 320x320, '
         'interleaved')
    stats = interleaved(steps, s.repeats, s.warmup, s.device)
    return Report([_relative_table(
        'mmdet Faster R-CNN training iteration (batch 2 at 320x320)',
        ['backbone', 's / iter', 'vs R50'], stats, 'R50')], data=stats)


#: The sections by name, in the order of the report.
SECTIONS: Dict[str, Callable[[BenchmarkSettings], Report]] = dict(
    train=bench_train, ops=bench_ops, launches=bench_launches, kernel=bench_kernel,
    block=bench_block, infer=bench_infer, fold=bench_fold, det=bench_det)

__all__ = ['SECTIONS', 'bench_kernel', 'bench_block', 'bench_infer', 'bench_fold',
           'bench_det']
