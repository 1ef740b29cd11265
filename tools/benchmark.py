"""Benchmarks (``make bench``): training cost, deploy speed and fold exactness.

Everything is measured side by side in one run with the same shapes, repeated, and reported
as median with spread (min-max); ratios are to the ``base`` ResNet-50 of the same run.

- ``train``: one training step (forward + backward + SGD with momentum) of ResNet-50 with
  each ``reparam`` at two workloads (batch 32 at 224x224, batch 8 at 160x160): time, and peak
  memory — on CPU each configuration runs in its own fresh subprocess and reports its peak
  resident memory growth over the interpreter with torch loaded; on a GPU
  ``torch.cuda.max_memory_allocated``;
- ``ops``: the device work of one training step (forward + backward) of ResNet-50 with each
  ``reparam``, counted deterministically: the ATen operators dispatched on ``meta`` tensors
  (each is one kernel launch on a GPU; views not counted), and how many each block type
  adds over ``base``;
- ``launches`` (CUDA only): the GPU kernels one training step of ResNet-50 (batch 8 at
  160) launches, counted by ``torch.profiler``, for each ``reparam`` and for OREPA with its
  generators per layer (``batched_generation=False``);
- ``kernel``: OREPA-ResNet-50 kernel generation alone (forward + backward): all 53
  generators per layer and in batches of one shape (``batched_kernel_generation``), and its
  16 OREPA 3x3 blocks against a literal transcription of the paper's branch equations (one
  einsum per branch);
- ``block``: one OREPA 3x3 block against ConvBN (256 channels, 56x56, batch 8);
- ``infer``: inference latency of the train-time OREPA-R50, its fold, and mmdet's ResNet-50;
- ``fold``: fold time and fold error (fp32, fp64) per backbone, and the fold time of a whole
  OREPA-R50 Mask R-CNN;
- ``det``: mmdet Faster R-CNN training iteration, OREPA-R50 / R50, at 320x320.

On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``) for all
configurations: with them an OREPA-R50 detector step ran 2x slower here.

Writes ``OUT/benchmark.md`` (tables) and ``OUT/benchmark.png`` (time and memory per block type)
and prints progress while it runs. Example::

    python tools/benchmark.py --out work_dirs/bench                 # everything
    python tools/benchmark.py --only train --workloads small --repeats 3
"""
import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPARAMS = ('base', 'ACB', 'DBB', 'OREPA', 'RepVGG')
WORKLOADS = {'paper': (32, 224), 'small': (8, 160)}
SECTIONS = ('ops', 'launches', 'train', 'kernel', 'block', 'infer', 'fold', 'det')


def log(msg):
    print(f'[bench {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name(0)
    return f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def timed(fn, repeats, warmup, device):
    """Median, min and max seconds of ``fn()`` over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return dict(median=statistics.median(times), min=min(times), max=max(times),
                samples=times)


def interleaved(fns, repeats, warmup, device):
    """Time several callables in alternation (rotating the order each round), so that the
    drift of a shared machine falls on all of them alike. Returns stats per name."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {n: dict(median=statistics.median(t), min=min(t), max=max(t))
            for n, t in times.items()}


def rss_bytes(field='VmRSS'):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def resnet50(reparam, **kwargs):
    from mmreparam.models.backbones import ResNet
    return ResNet(50, reparam=reparam, out_indices=(3, ), norm_eval=False, init_cfg=None,
                  **kwargs)


class Classifier(torch.nn.Module):
    """ResNet-50 + global pooling + 1000-way linear head, as in ImageNet training."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.fc = torch.nn.Linear(2048, 1000)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def train_step_child(reparam, batch, size, repeats, warmup, device, amp=None):
    """Run in a fresh subprocess: time and peak memory of one configuration (``amp``:
    None, or ``'bf16'`` for the forward pass under bfloat16 autocast)."""
    torch.manual_seed(0)
    base_rss = rss_bytes()
    model = Classifier(resnet50(reparam)).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch, ), device=device)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == 'bf16'):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()

    stats = timed(step, repeats, warmup, device)
    stats['times'] = stats.pop('samples')
    if device == 'cuda':
        stats['peak_memory'] = torch.cuda.max_memory_allocated()
    else:
        stats['peak_memory'] = rss_bytes('VmHWM') - base_rss
    stats['params'] = sum(p.numel() for p in model.parameters())
    return stats


def bench_train(args):
    """Each configuration in fresh subprocesses, over ``args.rounds`` rounds in rotating
    order; the time is the median over all measured steps of all rounds."""
    rows = {}
    for workload in args.workloads:
        batch, size = WORKLOADS[workload]
        steps = {r: [] for r in args.reparams}
        for round_ in range(args.rounds):
            order = args.reparams[round_ % len(args.reparams):] + \
                args.reparams[:round_ % len(args.reparams)]
            for reparam in order:
                log(f'train step: ResNet-50 {reparam}, batch {batch} at {size}x{size} '
                    f'(round {round_ + 1}/{args.rounds}, fresh subprocess)')
                cmd = [sys.executable, __file__, '--child', json.dumps(dict(
                    reparam=reparam, batch=batch, size=size, repeats=args.repeats,
                    warmup=args.warmup, device=args.device, amp=args.amp))]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f'benchmark child failed:\n{out.stderr[-3000:]}')
                result = json.loads(out.stdout.strip().splitlines()[-1])
                steps[reparam].append(result)
                log(f'    {result["median"]:.3f} s/step, peak memory '
                    f'{result["peak_memory"] / 2**30:.2f} GiB')
        for reparam, results in steps.items():
            times = [t for r in results for t in r['times']]
            rows[(workload, reparam)] = dict(
                median=statistics.median(times), min=min(times), max=max(times),
                peak_memory=max(r['peak_memory'] for r in results),
                params=results[0]['params'])
    return rows


def training_steps(args, device, batch, size):
    """``(name, model, step)`` for each ``reparam`` (and OREPA with its generators per
    layer): one forward + backward of a ResNet-50 classifier on ``device``."""
    variants = [(r, r, 'auto') for r in args.reparams]
    if 'OREPA' in args.reparams:
        variants.append(('OREPA, generators per layer', 'OREPA', False))
    for name, reparam, batched in variants:
        model = Classifier(resnet50(reparam)).to(device).train()
        model.backbone.batched_generation = batched
        x = torch.randn(batch, 3, size, size, device=device)

        def step(model=model, x=x):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        yield name, model, step


def bench_ops(args):
    """Operators dispatched by one ResNet-50 training step (forward + backward), on meta."""
    from mmreparam.testing import count_device_ops
    rows = {}
    for name, model, step in training_steps(args, 'meta', 2, 64):
        step()  # caches (generation constants) as in any later step
        rows[name] = count_device_ops(step)
        rows[name]['saved_bytes'] = saved_for_backward(model, torch.randn(32, 3, 224, 224,
                                                                         device='meta'))
        rows[name]['param_bytes'] = sum(p.numel() * p.element_size() for p in model.parameters())
        log(f'ops: {name}: {rows[name]["ops"]} operators, {rows[name]["views"]} views, '
            f'{rows[name]["saved_bytes"] / 2**30:.2f} GiB saved for backward at batch 32 @ 224')
    return rows


def saved_for_backward(model, x):
    """Bytes of the non-parameter tensors autograd keeps for the backward pass of
    ``model(x)`` (a view counts its own size): with parameters, gradients and optimizer
    state, the peak memory of a training step."""
    params = {id(p) for p in model.parameters()}
    saved = {}

    def pack(t):
        if id(t) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(saved.values())


def bench_launches(args):
    """GPU kernels launched by one ResNet-50 training step (CUDA only, torch.profiler)."""
    if args.device != 'cuda':
        log('launches: CUDA only (the ops section counts the same work on any machine)')
        return {}
    from torch.profiler import ProfilerActivity, profile
    rows = {}
    for name, _, step in training_steps(args, 'cuda', 8, 160):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == 'CUDA']
        rows[name] = dict(kernels=len(kernels),
                          gpu_ms=sum(e.device_time for e in kernels) / 1e3)
        log(f'launches: {name}: {len(kernels)} GPU kernels, {rows[name]["gpu_ms"]:.1f} ms '
            'of GPU time')
    return rows


def bench_kernel(args):
    """OREPA-R50 kernel generation, forward + backward: per layer vs batched (all 53
    generators), and ours vs literal (the 16 OREPA 3x3 blocks)."""
    from mmreparam.models.layers import OREPA
    from mmreparam.models.layers.orepa import BATCHED_GENERATORS, batched_kernel_generation
    from mmreparam.testing import literal_orepa_kernel, randomize_parameters
    model = resnet50('OREPA').to(args.device)
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

    log(f'kernel generation: all {len(generators)} generators of OREPA-ResNet-50, per layer '
        'and batched, interleaved')
    gen_stats = interleaved(dict(per_layer=lambda: all_generators(False),
                                 batched=lambda: all_generators(True)),
                            args.repeats, args.warmup, args.device)
    log(f'kernel generation: {len(blocks)} OREPA 3x3 blocks of ResNet-50, ours vs the '
        'literal paper equations (one einsum per branch), interleaved')
    stats = interleaved(dict(ours=lambda: run(lambda b: b.generate_kernel()),
                             literal=lambda: run(literal_orepa_kernel)),
                        args.repeats, args.warmup, args.device)
    ours, literal = stats['ours'], stats['literal']
    with torch.no_grad():
        kernels = [(literal_orepa_kernel(b), b.generate_kernel()) for b in blocks]
        per_layer = [g.generate_kernel() for g in generators]
        with batched_kernel_generation(model, constants, cpu=True):
            batched = [g.generate_kernel() for g in generators]
    err = max(((lit - k).abs().max() / k.abs().max()).item() for lit, k in kernels)
    batch_err = max(((a - b).abs().max() / a.abs().max()).item()
                    for a, b in zip(per_layer, batched))
    return dict(ours=ours, literal=literal, max_rel_difference=err, generators=len(generators),
                per_layer=gen_stats['per_layer'], batched=gen_stats['batched'],
                batched_max_rel_difference=batch_err)


def bench_block(args):
    from mmreparam.models.layers import OREPA, ConvBN
    x = torch.randn(8, 256, 56, 56, device=args.device)
    blocks = dict(ConvBN=ConvBN(256, 256, 3), OREPA=OREPA(256, 256, 3))
    for block in blocks.values():
        block.to(args.device).train()
    log('block: ConvBN vs OREPA 3x3, 256 channels, 56x56, batch 8, forward + backward')
    return interleaved({name: (lambda b=b: b(x).sum().backward()) for name, b in blocks.items()},
                       args.repeats, args.warmup, args.device)


def bench_infer(args):
    from mmdet.models.backbones import ResNet as DetResNet

    import mmreparam
    batch, size = args.infer_shape
    x = torch.randn(batch, 3, size, size, device=args.device)
    train_time = resnet50('OREPA').to(args.device).eval()
    folded = mmreparam.fold(train_time)
    plain = DetResNet(50, out_indices=(3, )).to(args.device)
    plain.eval()
    models = {'mmdet ResNet-50': plain, 'OREPA-R50 folded': folded,
              'OREPA-R50 train-time': train_time}
    log(f'inference: mmdet ResNet-50, OREPA-R50 folded and train-time, batch {batch} at '
        f'{size}x{size}, interleaved')
    with torch.inference_mode():
        return interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, args.repeats,
                           args.warmup, args.device)


def bench_fold(args):
    import mmreparam
    from mmreparam.models.backbones import RepVGG
    from mmreparam.testing import randomize_bn, randomize_parameters
    rows = {}
    models = {f'ResNet-50 {r}': (lambda r=r: resnet50(r)) for r in REPARAMS}
    models['RepVGG-A0 RepVGG'] = lambda: RepVGG('A0', reparam='RepVGG')
    models['RepVGG-A0 OREPA_VGG'] = lambda: RepVGG('A0', reparam='OREPA_VGG')
    for name, make in models.items():
        log(f'fold: {name}')
        torch.manual_seed(0)
        model = randomize_bn(randomize_parameters(make(), ('vector', 'idconv1'), seed=1))
        model.to(args.device).eval()
        start = time.perf_counter()
        folded = mmreparam.fold(model)
        sync(args.device)
        seconds = time.perf_counter() - start
        x = torch.randn(2, 3, 96, 96, device=args.device)
        err32 = mmreparam.fold_error(model, folded, x)['max_rel']
        model64 = copy.deepcopy(model).double()
        err64 = mmreparam.fold_error(model64, mmreparam.fold(model64), x.double())['max_rel']
        rows[name] = dict(seconds=seconds, fp32=err32, fp64=err64)
    try:
        from mmdet.registry import MODELS
    except ImportError:
        log('fold: mmdet is not installed: no whole-detector fold time')
        return rows
    log('fold: whole OREPA-R50 Mask R-CNN (mmdet)')
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(os.path.join(os.path.dirname(__file__), '..', 'configs', 'mmdet',
                                       'mask-rcnn_orepa-r50_fpn_1x_coco.py'))
    init_default_scope('mmdet')
    detector = MODELS.build(cfg.model).eval()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        mmreparam.fold(detector)
        times.append(time.perf_counter() - start)
    rows['Mask R-CNN OREPA-R50 (whole model, deep copy included)'] = dict(
        seconds=statistics.median(times), fp32=float('nan'), fp64=float('nan'))
    return rows


def bench_det(args):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    root = os.path.join(os.path.dirname(__file__), '..', 'configs', 'mmdet')
    data = demo_mm_inputs(2, image_shapes=(3, 320, 320), num_classes=80)
    steps = {}
    for name, cfg_name in (('R50', 'faster-rcnn_base-r50_fpn_1x_coco.py'),
                           ('OREPA-R50', 'faster-rcnn_orepa-r50_fpn_1x_coco.py')):
        cfg = Config.fromfile(os.path.join(root, cfg_name))
        cfg.model.backbone.init_cfg = None
        init_default_scope('mmdet')
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()  # as in training (default init can leave denormal activations)
        model = model.to(args.device).train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                              momentum=0.9)

        def step(model=model, opt=opt):
            batch = model.data_preprocessor(copy.deepcopy(data), True)
            losses = model(**batch, mode='loss')
            loss = sum(v.sum() if torch.is_tensor(v) else sum(v)
                       for k, v in losses.items() if 'loss' in k)
            opt.zero_grad()
            loss.backward()
            opt.step()

        steps[name] = step
    log('det: Faster R-CNN R50 and OREPA-R50 training iterations, batch 2 at 320x320, '
        'interleaved')
    return interleaved(steps, args.repeats, args.warmup, args.device)


def fmt_t(stats):
    return f'{stats["median"]:.3f} ({stats["min"]:.3f}-{stats["max"]:.3f})'


def report(results, args, elapsed):
    lines = ['# mmreparam benchmark', '',
             f'Measured {datetime.date.today()} on {device_name(args.device)} '
             f'({args.device}), torch {torch.__version__}, median of {args.repeats} runs '
             f'(min-max), in {elapsed / 60:.1f} min with `python tools/benchmark.py '
             f'{" ".join(args.argv)}`.', '']
    if 'train' in results:
        rows = results['train']
        amp = ', forward under bfloat16 autocast' if args.amp == 'bf16' else ''
        lines += [f'## Training step of ResNet-50 (forward + backward + SGD momentum{amp})', '',
                  '| workload | reparam | params | s / step | time vs base | '
                  'peak memory (GiB) | memory vs base |', '|---|---|---|---|---|---|---|']
        for workload in args.workloads:
            base = rows.get((workload, 'base'))
            for reparam in args.reparams:
                r = rows[(workload, reparam)]
                batch, size = WORKLOADS[workload]
                t_ratio = r['median'] / base['median'] if base else float('nan')
                m_ratio = r['peak_memory'] / base['peak_memory'] if base else float('nan')
                lines.append(f'| batch {batch} @ {size} | {reparam} | {r["params"] / 1e6:.1f}M '
                             f'| {fmt_t(r)} | {t_ratio:.2f}x | '
                             f'{r["peak_memory"] / 2**30:.2f} | {m_ratio:.2f}x |')
        lines.append('')
    if 'ops' in results:
        o = results['ops']
        base = o.get('base', {}).get('ops')
        lines += ['## Device work of a ResNet-50 training step (forward + backward)', '',
                  'ATen operators dispatched on `meta` tensors (batch 2 at 64x64; the count '
                  'does not depend on the input size): one kernel launch each on a GPU. '
                  'Deterministic.', '',
                  '| reparam | operators | added over base | views | saved for backward, '
                  'batch 32 @ 224 (GiB) | parameters (GiB) |', '|---|---|---|---|---|---|']
        for reparam, r in o.items():
            added = r['ops'] - base if base is not None else float('nan')
            lines.append(f'| {reparam} | {r["ops"]} | {added} | {r["views"]} | '
                         f'{r["saved_bytes"] / 2**30:.2f} | {r["param_bytes"] / 2**30:.3f} |')
        lines += ['', 'Saved tensors plus three times the parameters (weights, gradients, '
                  'momentum) approximate the peak memory of a step (base: 2.86 GiB measured '
                  'on an H100 on 2026-11-22).', '']
    if results.get('launches'):
        lines += ['## GPU kernels of a ResNet-50 training step (forward + backward, batch 8 '
                  'at 160, torch.profiler)', '',
                  '| model | kernels | GPU time (ms) |', '|---|---|---|']
        for name, r in results['launches'].items():
            lines.append(f'| {name} | {r["kernels"]} | {r["gpu_ms"]:.1f} |')
        lines.append('')
    if 'kernel' in results:
        k = results['kernel']
        lines += [f'## OREPA-R50 kernel generation of all its {k["generators"]} generators '
                  '(forward + backward)', '',
                  '| implementation | s | ratio |', '|---|---|---|',
                  f'| per layer | {fmt_t(k["per_layer"])} | 1.00x |',
                  f'| batched by shape | {fmt_t(k["batched"])} | '
                  f'{k["batched"]["median"] / k["per_layer"]["median"]:.2f}x |', '',
                  f'Max relative difference of the kernels: '
                  f'{k["batched_max_rel_difference"]:.1e}.', '']
        lines += ['## OREPA-R50 kernel generation of its 16 OREPA 3x3 blocks '
                  '(forward + backward)', '',
                  '| implementation | s | ratio |', '|---|---|---|',
                  f'| literal paper equations (one einsum per branch) | {fmt_t(k["literal"])} '
                  '| 1.00x |',
                  f'| mmreparam | {fmt_t(k["ours"])} | '
                  f'{k["ours"]["median"] / k["literal"]["median"]:.2f}x |', '',
                  f'Max relative difference of the generated kernels: '
                  f'{k["max_rel_difference"]:.1e}.', '']
    if 'block' in results:
        b = results['block']
        lines += ['## One 3x3 block, forward + backward (256 ch, 56x56, batch 8)', '',
                  '| block | s | vs ConvBN |', '|---|---|---|']
        for name, r in b.items():
            lines.append(f'| {name} | {fmt_t(r)} | '
                         f'{r["median"] / b["ConvBN"]["median"]:.2f}x |')
        lines.append('')
    if 'infer' in results:
        r = results['infer']
        plain = r['mmdet ResNet-50']['median']
        batch, size = args.infer_shape
        lines += [f'## Inference latency (batch {batch} at {size}x{size})', '',
                  '| model | s | vs mmdet ResNet-50 |', '|---|---|---|']
        for name, stats in r.items():
            lines.append(f'| {name} | {fmt_t(stats)} | {stats["median"] / plain:.3f}x |')
        lines += ['', 'mmdet\'s ResNet-50 runs its BatchNorms as separate ops in eval mode; '
                  'the folded model has them fused into its convolutions.']
        lines.append('')
    if 'fold' in results:
        lines += ['## Fold time and exactness', '',
                  '| model | fold time (s) | max rel error fp32 | max rel error fp64 |',
                  '|---|---|---|---|']
        for name, r in results['fold'].items():
            lines.append(f'| {name} | {r["seconds"]:.3f} | {r["fp32"]:.1e} | {r["fp64"]:.1e} |')
        lines.append('')
    if 'det' in results:
        d = results['det']
        lines += ['## mmdet Faster R-CNN training iteration (batch 2 at 320x320)', '',
                  '| backbone | s / iter | vs R50 |', '|---|---|---|']
        for name, r in d.items():
            lines.append(f'| {name} | {fmt_t(r)} | {r["median"] / d["R50"]["median"]:.2f}x |')
        lines.append('')
    return '\n'.join(lines)


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = results['train']
    workloads = sorted({w for w, _ in rows}, key=list(WORKLOADS).index)
    reparams = [r for r in REPARAMS if any((w, r) in rows for w in workloads)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(workloads)
    for i, workload in enumerate(workloads):
        base = rows[(workload, 'base')]
        xs = [j + i * width for j in range(len(reparams))]
        batch, size = WORKLOADS[workload]
        label = f'batch {batch} @ {size}'
        axes[0].bar(xs, [rows[(workload, r)]['median'] / base['median'] for r in reparams],
                    width, label=label)
        axes[1].bar(xs, [rows[(workload, r)]['peak_memory'] / base['peak_memory']
                         for r in reparams], width, label=label)
    for ax, title in zip(axes, ('training step time vs base', 'peak memory vs base')):
        ax.set_xticks([j + width * (len(workloads) - 1) / 2 for j in range(len(reparams))])
        ax.set_xticklabels(reparams)
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle('ResNet-50 training cost by block type (mmreparam)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='work_dirs/bench')
    parser.add_argument('--only', nargs='+', choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument('--reparams', nargs='+', choices=REPARAMS, default=list(REPARAMS))
    parser.add_argument('--workloads', nargs='+', choices=list(WORKLOADS),
                        default=list(WORKLOADS))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=2,
                        help='rounds of fresh subprocesses per training configuration')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--infer-shape', type=int, nargs=2, default=(8, 224),
                        metavar=('BATCH', 'SIZE'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', choices=('bf16', ), default=None,
                        help='train section: run the forward pass under bfloat16 autocast')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == 'cpu':
        # Denormal floats make CPU arithmetic many times slower; an OREPA-R50 Faster R-CNN
        # step took 10 s with them and 4.5 s without (R50: 2.9 s either way). Flushed for
        # every configuration alike, as one would when training on CPU.
        torch.set_flush_denormal(True)
    if args.child:
        print(json.dumps(train_step_child(**json.loads(args.child))))
        return
    if 'base' not in args.reparams:
        args.reparams = ['base', *args.reparams]
    args.argv = sys.argv[1:]
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    results = {}
    for section in SECTIONS:
        if section in args.only:
            results[section] = globals()[f'bench_{section}'](args)
    table = report(results, args, time.time() - start)
    with open(os.path.join(args.out, 'benchmark.md'), 'w') as f:
        f.write(table + '\n')
    if 'train' in results:
        plot(results, os.path.join(args.out, 'benchmark.png'))
    print('\n' + table)
    log(f'wrote {args.out}/benchmark.md' + (' and benchmark.png' if 'train' in results else ''))


if __name__ == '__main__':
    main()
