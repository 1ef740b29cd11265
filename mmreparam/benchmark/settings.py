"""What a benchmark run measures: :class:`BenchmarkSettings`."""
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

#: Training workloads by name: (batch, image side).
WORKLOADS = {'paper': (32, 224), 'small': (8, 160)}


def _all_reparams() -> Tuple[str, ...]:
    from ..models.layers.factory import REPARAM_TYPES
    return tuple(REPARAM_TYPES)


@dataclass
class BenchmarkSettings:
    """The settings every benchmark section reads.

    Args:
        device (str): ``'cpu'`` or ``'cuda'``. Defaults to ``'cpu'``.
        reparams (Sequence[str]): The ResNet-50 block types of the training-cost sections,
            names of :data:`~mmreparam.models.layers.factory.REPARAM_TYPES`. Defaults to all
            of them.
        workloads (Sequence[str]): Names of :data:`WORKLOADS`. Defaults to all.
        repeats (int): Timed runs of each measurement. Defaults to 5.
        rounds (int): Rounds of fresh subprocesses per training configuration. Defaults
            to 2.
        warmup (int): Untimed runs first. Defaults to 1.
        infer_shape (tuple[int, int]): Batch and image side of the inference section.
            Defaults to ``(8, 224)``.
        amp (str, optional): ``'bf16'``: the training section runs the forward pass under
            bfloat16 autocast. Defaults to None.
        config_dir (str): mmreparam's ``configs/`` folder (the mmdet sections build their
            detectors from it). Defaults to ``'configs'``.

    Raises:
        ValueError: An unknown block type or workload, a count below its least value
            (``repeats`` and ``rounds`` 1, ``warmup`` 0), a bad ``infer_shape`` or ``amp``.
    """
    device: str = 'cpu'
    reparams: Sequence[str] = field(default_factory=_all_reparams)
    workloads: Sequence[str] = tuple(WORKLOADS)
    repeats: int = 5
    rounds: int = 2
    warmup: int = 1
    infer_shape: Tuple[int, int] = (8, 224)
    amp: Optional[str] = None
    config_dir: str = 'configs'

    def __post_init__(self):
        # Checked before anything runs: a count of 0 would fail only at the first median,
        # after minutes of measuring.
        for name, least in (('repeats', 1), ('rounds', 1), ('warmup', 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f'{name} must be an int of at least {least}, got {value!r}')
        if (len(self.infer_shape) != 2
                or not all(isinstance(v, int) and v >= 1 for v in self.infer_shape)):
            raise ValueError('infer_shape must be two positive ints (batch, size), '
                             f'got {self.infer_shape!r}')
        if self.amp not in (None, 'bf16'):
            raise ValueError(f"amp must be None or 'bf16', got {self.amp!r}")
        unknown = [r for r in self.reparams if r not in _all_reparams()]
        if unknown:
            raise ValueError(f'unknown reparam {unknown}; choose from {_all_reparams()}')
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown:
            raise ValueError(f'unknown workload {unknown}; choose from {tuple(WORKLOADS)}')
        self.reparams = list(self.reparams)
        if 'base' not in self.reparams:  # every ratio is to base
            self.reparams.insert(0, 'base')


__all__ = ['WORKLOADS', 'BenchmarkSettings']
