"""The training-cost sections (``train``, ``ops``, ``launches``): ResNet-50 with each
``reparam`` (names of :data:`~mmreparam.models.layers.factory.REPARAM_TYPES`)."""
import json
import os.path as osp
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, Optional, Tuple

import torch

from .report import Report, Table, fmt_time
from .settings import WORKLOADS, BenchmarkSettings
from .timing import log, rss_bytes, summary, timed

GiB = 2**30


def resnet50(reparam: str, **kwargs) -> torch.nn.Module:
    """mmreparam's ResNet-50 with ``reparam`` blocks, last stage out, no init checkpoint."""
    from ..models.backbones import ResNet
    return ResNet(50, reparam=reparam, out_indices=(3, ), norm_eval=False, init_cfg=None,
                  **kwargs)


class Classifier(torch.nn.Module):
    """ResNet-50 + global pooling + 1000-way linear head, as in ImageNet training.

    Args:
        backbone (nn.Module): A ResNet-50 whose last output has 2048 channels.
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.fc = torch.nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x``."""
        return self.fc(self.backbone(x)[-1].mean((2, 3)))


def train_step_cost(reparam: str, batch: int, size: int, repeats: int, warmup: int,
                    device: str, amp: Optional[str] = None) -> dict:
    """Time and peak memory of one ResNet-50 training step (forward + backward + SGD with
    momentum), meant to run in a fresh process (``python -m mmreparam.benchmark.child``).

    Args:
        reparam (str): The block type.
        batch (int): Batch size.
        size (int): Image side.
        repeats (int): Timed steps.
        warmup (int): Untimed steps first.
        device (str): ``'cpu'`` or ``'cuda'``.
        amp (str, optional): ``'bf16'``: the forward pass under bfloat16 autocast.

    Returns:
        dict: ``median``, ``min``, ``max``, ``times`` (seconds), ``peak_memory`` (bytes:
        ``torch.cuda.max_memory_allocated`` on a GPU, else the growth of the peak resident
        memory over the process with torch loaded) and ``params``.
    """
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


def _train_step_in_subprocess(**kwargs) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = osp.join(tmp, 'result.json')
        cmd = [sys.executable, '-m', 'mmreparam.benchmark.child', json.dumps(kwargs), result]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f'benchmark child failed:\n{out.stderr[-3000:]}')
        with open(result) as f:
            return json.load(f)


def bench_train(s: BenchmarkSettings) -> Report:
    """Training step time and peak memory of ResNet-50 per ``reparam`` and workload: each
    configuration in fresh subprocesses, over ``s.rounds`` rounds in rotating order; the
    time is the median over all measured steps of all rounds."""
    rows = {}
    for workload in s.workloads:
        batch, size = WORKLOADS[workload]
        steps = {r: [] for r in s.reparams}
        for round_ in range(s.rounds):
            shift = round_ % len(s.reparams)
            for reparam in [*s.reparams[shift:], *s.reparams[:shift]]:
                log(f'train step: ResNet-50 {reparam}, batch {batch} at {size}x{size} '
                     f'(round {round_ + 1}/{s.rounds}, fresh subprocess)')
                result = _train_step_in_subprocess(
                    reparam=reparam, batch=batch, size=size, repeats=s.repeats,
                    warmup=s.warmup, device=s.device, amp=s.amp)
                steps[reparam].append(result)
                log(f'    {result["median"]:.3f} s/step, peak memory '
                     f'{result["peak_memory"] / GiB:.2f} GiB')
        for reparam, results in steps.items():
            times = [t for r in results for t in r['times']]
            rows[(workload, reparam)] = dict(
                summary(times), peak_memory=max(r['peak_memory'] for r in results),
                params=results[0]['params'])
    amp = ', forward under bfloat16 autocast' if s.amp == 'bf16' else ''
    table = Table(f'Training step of ResNet-50 (forward + backward + SGD momentum{amp})',
                  ['workload', 'reparam', 'params', 's / step', 'time vs base',
                   'peak memory (GiB)', 'memory vs base'])
    nan = float('nan')
    for workload in s.workloads:
        base = rows.get((workload, 'base'))
        batch, size = WORKLOADS[workload]
        for reparam in s.reparams:
            r = rows[(workload, reparam)]
            t_ratio = r['median'] / base['median'] if base else nan
            m_ratio = r['peak_memory'] / base['peak_memory'] if base else nan
            table.add(f'batch {batch} @ {size}', reparam, f'{r["params"] / 1e6:.1f}M',
                      fmt_time(r), f'{t_ratio:.2f}x', f'{r["peak_memory"] / GiB:.2f}',
                      f'{m_ratio:.2f}x')
    return Report([table], data=rows)


def _training_steps(s: BenchmarkSettings, device: str, batch: int, size: int
                    ) -> Iterator[Tuple[str, torch.nn.Module, Callable[[], None]]]:
    """``(name, model, step)`` for each ``reparam`` (and OREPA with its generators per
    layer): one forward + backward of a ResNet-50 classifier on ``device``."""
    variants = [(r, r, 'auto') for r in s.reparams]
    if 'OREPA' in s.reparams:
        variants.append(('OREPA, generators per layer', 'OREPA', False))
    for name, reparam, batched in variants:
        model = Classifier(resnet50(reparam)).to(device).train()
        model.backbone.batched_generation = batched
        x = torch.randn(batch, 3, size, size, device=device)

        def step(model=model, x=x):
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        yield name, model, step


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor) -> int:
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


def bench_ops(s: BenchmarkSettings) -> Report:
    """ATen operators dispatched by one ResNet-50 training step (forward + backward) on
    ``meta`` tensors (one kernel launch each on a GPU), saved-for-backward and parameter
    bytes: deterministic, on any machine."""
    from ..testing import count_device_ops
    rows = {}
    for name, model, step in _training_steps(s, 'meta', 2, 64):
        step()  # caches (generation constants) as in any later step
        rows[name] = count_device_ops(step)
        rows[name]['saved_bytes'] = saved_for_backward(
            model, torch.randn(32, 3, 224, 224, device='meta'))
        rows[name]['param_bytes'] = sum(p.numel() * p.element_size()
                                        for p in model.parameters())
        log(f'ops: {name}: {rows[name]["ops"]} operators, {rows[name]["views"]} views, '
             f'{rows[name]["saved_bytes"] / GiB:.2f} GiB saved for backward at batch 32 @ 224')
    base = rows.get('base', {}).get('ops')
    table = Table(
        'Device work of a ResNet-50 training step (forward + backward)',
        ['reparam', 'operators', 'added over base', 'views',
         'saved for backward, batch 32 @ 224 (GiB)', 'parameters (GiB)'],
        intro='ATen operators dispatched on `meta` tensors (batch 2 at 64x64; the count does '
        'not depend on the input size): one kernel launch each on a GPU. Deterministic.',
        notes=['Saved tensors plus three times the parameters (weights, gradients, momentum) '
               'approximate the peak memory of a step (base: 2.86 GiB measured on an H100 on '
               '2026-11-22).'])
    for name, r in rows.items():
        added = r['ops'] - base if base is not None else float('nan')
        table.add(name, r['ops'], added, r['views'], f'{r["saved_bytes"] / GiB:.2f}',
                  f'{r["param_bytes"] / GiB:.3f}')
    return Report([table], data=rows)


def bench_launches(s: BenchmarkSettings) -> Report:
    """GPU kernels launched by one ResNet-50 training step (batch 8 at 160), counted by
    ``torch.profiler``; CUDA only (no tables elsewhere)."""
    if s.device != 'cuda':
        log('launches: CUDA only (the ops section counts the same work on any machine)')
        return Report([])
    from torch.profiler import ProfilerActivity, profile
    table = Table('GPU kernels of a ResNet-50 training step (forward + backward, batch 8 at '
                  '160, torch.profiler)', ['model', 'kernels', 'GPU time (ms)'])
    rows = {}
    for name, _, step in _training_steps(s, 'cuda', 8, 160):
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
        table.add(name, len(kernels), f'{rows[name]["gpu_ms"]:.1f}')
    return Report([table] if rows else [], data=rows)


__all__ = ['Classifier', 'resnet50', 'train_step_cost', 'saved_for_backward', 'bench_train',
           'bench_ops', 'bench_launches']
