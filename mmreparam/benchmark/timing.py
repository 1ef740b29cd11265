"""Timing and memory primitives of the benchmarks: medians with spread, interleaved runs."""
import platform
import statistics
import time
from typing import Callable, Dict

import torch
from mmengine.logging import print_log


def log(message: str) -> None:
    """Log a benchmark's progress (``bench: message``) to the current logger."""
    print_log(f'bench: {message}', logger='current')


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's with the number of torch threads."""
    if device == 'cuda':
        return torch.cuda.get_device_name(0)
    return f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for elsewhere."""
    if device == 'cuda':
        torch.cuda.synchronize()


def summary(times) -> dict:
    """``median``, ``min`` and ``max`` of a list of seconds."""
    return dict(median=statistics.median(times), min=min(times), max=max(times))


def timed(fn: Callable[[], object], repeats: int, warmup: int, device: str) -> dict:
    """Time ``fn()`` on ``device``.

    Args:
        fn (callable): What to time.
        repeats (int): Timed runs.
        warmup (int): Untimed runs first.
        device (str): Where ``fn`` runs (synchronized around each run).

    Returns:
        dict: ``median``, ``min``, ``max`` seconds and the ``samples``.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return dict(summary(times), samples=times)


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                device: str) -> Dict[str, dict]:
    """Time several callables in alternation, rotating the order each round, so that the
    drift of a shared machine falls on all of them alike.

    Args:
        fns (dict[str, callable]): What to time, by name.
        repeats (int): Timed rounds.
        warmup (int): Untimed runs of each first.
        device (str): Where they run.

    Returns:
        dict[str, dict]: ``median``, ``min`` and ``max`` seconds per name.
    """
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
    return {n: summary(t) for n, t in times.items()}


def rss_bytes(field: str = 'VmRSS') -> int:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in bytes (Linux).

    Raises:
        RuntimeError: ``/proc/self/status`` has no such field.
    """
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


__all__ = ['log', 'device_name', 'sync', 'summary', 'timed', 'interleaved', 'rss_bytes']
