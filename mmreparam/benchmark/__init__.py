"""Benchmarks (``tools/benchmark.py``, ``make bench``): training cost, deploy speed and fold
exactness, measured side by side in one run with the same shapes, repeated, and reported as
median with spread (min-max); ratios are to the ``base`` ResNet-50 of the same run.

The sections (:data:`SECTIONS`, each a function ``(settings) -> Report`` that measures and
writes its own tables; block types come from the block registry):

- ``train``: one training step (forward + backward + SGD with momentum) of ResNet-50 with
  each ``reparam`` at two workloads (batch 32 at 224x224, batch 8 at 160x160): time, and
  peak memory. On CPU each configuration runs in its own fresh subprocess and reports its
  peak resident memory growth over the interpreter with torch loaded; on a GPU
  ``torch.cuda.max_memory_allocated``;
- ``ops``: the device work of one training step (forward + backward) of ResNet-50 with each
  ``reparam``, counted deterministically: the ATen operators dispatched on ``meta`` tensors
  (each is one kernel launch on a GPU; views not counted), and how many each block type
  adds over ``base``;
- ``launches`` (CUDA only): the GPU kernels one training step of ResNet-50 (batch 8 at
  160) launches, counted by ``torch.profiler``, for each ``reparam`` and for OREPA with its
  generators per layer (``batched_generation=False``);
- ``kernel``: OREPA-ResNet-50 kernel generation alone (forward + backward): all its
  generators per layer and in batches of one shape (``batched_kernel_generation``), and its
  OREPA 3x3 blocks against a literal transcription of the paper's branch equations (one
  einsum per branch);
- ``block``: one OREPA 3x3 block against ConvBN (256 channels, 56x56, batch 8);
- ``infer``: inference latency of the train-time OREPA-R50, its fold, and mmdet's ResNet-50;
- ``fold``: fold time and fold error (fp32, fp64) per backbone and block type, and the fold
  time of a whole OREPA-R50 Mask R-CNN;
- ``det``: mmdet Faster R-CNN training iteration, OREPA-R50 / R50, at 320x320.

On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``) for all
configurations alike, as one would when training on CPU: denormal arithmetic is many times
slower there and hit the OREPA detector far more than the plain one.
"""
from typing import Dict, Optional, Sequence

import torch

from .report import Report, Table, benchmark_markdown, fmt_time, plot_training_cost
from .sections import SECTIONS
from .settings import WORKLOADS, BenchmarkSettings


def run_benchmark(settings: BenchmarkSettings,
                  sections: Optional[Sequence[str]] = None) -> Dict[str, Report]:
    """Run benchmark sections.

    Args:
        settings (BenchmarkSettings): What to measure and how often.
        sections (Sequence[str], optional): Names of :data:`SECTIONS`. Defaults to all.

    Returns:
        dict[str, Report]: The reports by section, in the order of :data:`SECTIONS`.

    Raises:
        ValueError: An unknown section name.
    """
    sections = list(SECTIONS) if sections is None else list(sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f'unknown benchmark section {unknown}; choose from {tuple(SECTIONS)}')
    if settings.device == 'cpu':
        torch.set_flush_denormal(True)
    return {name: bench(settings) for name, bench in SECTIONS.items() if name in sections}


__all__ = ['SECTIONS', 'WORKLOADS', 'BenchmarkSettings', 'Report', 'Table', 'fmt_time',
           'run_benchmark', 'benchmark_markdown', 'plot_training_cost']
