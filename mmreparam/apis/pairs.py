"""Finding the conv -> BatchNorm pairs of any model by following its data.

A convolution and a BatchNorm form a pair when, in a forward pass, the BatchNorm's input is
the convolution's output and nothing else uses that output. This is found by running the
model once on an example input with module hooks (which module runs, what it returns) and a
``TorchFunctionMode`` (every torch operation and the tensors it reads), not from attribute
names: it works for mmcv's ``ConvModule``, for ``convN`` / ``normN`` attribute pairs
(mmdet's ResNet family, RegNet, HRNet), ``nn.Sequential`` pairs and timm-style modules
alike. :func:`mmreparam.reparameterize` turns the pairs into re-param blocks; a conv -> BN
fusion can use the same search.
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..models.layers.base import Foldable, is_mmreparam
from ..models.layers.norm import SyncBatchNorm as MMReparamSyncBN

#: Tensor attributes and methods that read metadata only: calling them is not a use of the
#: tensor's values.
_METADATA = frozenset({
    'shape', 'dtype', 'device', 'ndim', 'is_cuda', 'requires_grad', 'layout', 'is_sparse',
    'is_quantized', 'is_meta', 'names', 'size', 'dim', 'numel', 'nelement', 'stride',
    'is_contiguous', 'is_floating_point', 'is_complex', 'element_size', 'get_device',
    'data_ptr', 'storage_offset', '__len__', '__format__', '__repr__', 'grad_fn', 'is_leaf',
    'output_nr', '_version'
})

#: ``forward`` methods of the BatchNorms whose function is a plain batch normalization.
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward,
                      MMReparamSyncBN.forward)


def _plain_conv_forwards() -> Tuple[Any, ...]:
    forwards = [nn.Conv2d.forward]
    try:  # mmcv's Conv2d wrapper only adds the empty-input case
        from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
        forwards.append(MMCVConv2d.forward)
    except ImportError:  # pragma: no cover - mmcv is a dependency
        pass
    return tuple(forwards)


@dataclass
class ConvBNPair:
    """A convolution whose output goes into a BatchNorm.

    Attributes:
        conv (str): The convolution's path in the searched module (``named_modules``).
        norm (str): The BatchNorm's path.
        problem (str, optional): Why the two cannot be merged (the conv's output is used
            elsewhere as well, a module runs more than once, the BN has no running
            statistics, ...); None when they can.
    """
    conv: str
    norm: str
    problem: Optional[str] = None

    @property
    def mergeable(self) -> bool:
        """Whether the BatchNorm is the only user of the conv's output (no problem)."""
        return self.problem is None


def _name(func) -> str:
    name = getattr(func, '__name__', '')
    if name in ('__get__', '__set__'):
        name = getattr(getattr(func, '__self__', None), '__name__', name)
    return name


class _Tracer(TorchFunctionMode):
    """Records, during one forward pass, what each convolution returns, where each
    BatchNorm's input comes from, and every torch operation that reads a conv output."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.paths = {module: name for name, module in root.named_modules()}
        self.stack: List[nn.Module] = []
        self.calls: Dict[nn.Module, int] = {}
        self.outputs: Dict[int, Tuple[nn.Module, Tensor]] = {}  # id -> (conv, output)
        self.uses: Dict[nn.Module, List[Tuple[str, Tuple[nn.Module, ...]]]] = {}
        self.norm_inputs: Dict[nn.Module, List[nn.Module]] = {}  # BN -> convs feeding it
        self.root_name = type(root).__name__
        self.handles = []
        skip = set()
        for module in root.modules():
            if module in skip:
                continue
            if is_mmreparam(module) and isinstance(module, Foldable):
                skip.update(m for m in module.modules() if m is not module)
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))
        self.skip = skip

    def _enter(self, module: nn.Module, args) -> None:
        self.stack.append(module)
        self.calls[module] = self.calls.get(module, 0) + 1
        if isinstance(module, _BatchNorm) and module not in self.skip and args:
            source = self.outputs.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                self.norm_inputs.setdefault(module, []).append(source[0])

    def _leave(self, module: nn.Module, args, output) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if isinstance(module, nn.Conv2d) and module not in self.skip \
                and isinstance(output, Tensor):
            self.outputs[id(output)] = (module, output)  # keeps the tensor (and its id) alive

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _name(func) not in _METADATA:
            for value in tree_flatten((args, kwargs))[0]:
                if isinstance(value, Tensor):
                    self._note_use(value, _name(func))
        return func(*args, **kwargs)

    def _note_use(self, tensor: Tensor, what: str) -> None:
        source = self.outputs.get(id(tensor))
        if source is not None and source[1] is tensor:
            self.uses.setdefault(source[0], []).append((what, tuple(self.stack)))

    def note_output(self, output: Any) -> None:
        """The searched module's own output counts as a use of the tensors it returns."""
        for value in tree_flatten(output)[0]:
            if isinstance(value, Tensor):
                self._note_use(value, f'returned by {self.root_name}')

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _conv_problem(conv: nn.Conv2d) -> Optional[str]:
    if type(conv).forward not in _plain_conv_forwards():
        return f'{type(conv).__name__} is not a plain convolution (its own forward)'
    return None


def _norm_problem(norm: _BatchNorm, conv: nn.Conv2d) -> Optional[str]:
    if type(norm).forward not in _PLAIN_BN_FORWARDS:
        return f'{type(norm).__name__} is not a plain BatchNorm (its own forward)'
    if norm.running_mean is None or norm.running_var is None:
        return f'{type(norm).__name__} has no running statistics (track_running_stats=False)'
    if norm.num_features != conv.out_channels:
        return (f'{type(norm).__name__} has {norm.num_features} features for '
                f'{conv.out_channels} conv outputs')
    return None


@contextlib.contextmanager
def _eval_no_grad(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def call_module(module: nn.Module, inputs: Sequence[Any]) -> Any:
    """``module(*inputs)``; a dict of keyword arguments is passed as such."""
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(*inputs)


def find_conv_bn_pairs(module: nn.Module, inputs: Sequence[Any]) -> List[ConvBNPair]:
    """Find every convolution whose output goes into a BatchNorm, by running ``module``.

    ``module`` runs once on ``inputs`` in eval mode without gradients (its train/eval flags
    are restored). A pair is mergeable when the conv (an ``nn.Conv2d`` with
    ``nn.Conv2d``'s forward; mmcv's ``Conv2d`` wrapper counts) and the BatchNorm (any
    ``_BatchNorm`` with the plain forward and running statistics) each run once and the BN
    is the only user of the conv's output: any other operation that reads it (a sum, a
    concatenation, an in-place change, the module returning it) leaves the pair with a
    ``problem``. Modules inside mmreparam's re-param blocks are not searched.

    Args:
        module (nn.Module): Any model or part of one.
        inputs (Sequence | dict): Positional arguments of ``module`` (a backbone: one image
            batch), or a dict of keyword arguments.

    Returns:
        list[ConvBNPair]: Every conv -> BN connection found, mergeable or not, in the order
        the convs ran.
    """
    tracer = _Tracer(module)
    try:
        with _eval_no_grad(module), tracer:
            output = call_module(module, inputs)
            tracer.note_output(output)
    finally:
        tracer.close()
    pairs = []
    for norm, convs in tracer.norm_inputs.items():
        for conv in convs:
            problem = _pair_problem(tracer, conv, norm, len(convs))
            pairs.append((conv, ConvBNPair(tracer.paths[conv], tracer.paths[norm], problem)))
    order = {conv: i for i, (conv, _) in enumerate(tracer.outputs.values())}
    pairs.sort(key=lambda item: order.get(item[0], 0))
    return [pair for _, pair in pairs]


def _pair_problem(tracer: _Tracer, conv: nn.Conv2d, norm: _BatchNorm,
                  sources: int) -> Optional[str]:
    runs_conv, runs_norm = tracer.calls.get(conv, 0), tracer.calls.get(norm, 0)
    if runs_conv != 1 or runs_norm != 1 or sources != 1:
        return (f'the conv runs {runs_conv} times and the BatchNorm {runs_norm} times in one '
                'forward pass (shared modules)')
    others = [what for what, stack in tracer.uses.get(conv, []) if norm not in stack]
    if others:
        return (f'the conv\'s output is used elsewhere too ({", ".join(sorted(set(others)))}'
                ')')
    return _conv_problem(conv) or _norm_problem(norm, conv)


def convmodule_pairs(module: nn.Module) -> List[ConvBNPair]:
    """The conv -> BN pairs that mmcv's ``ConvModule`` s in ``module`` hold by
    construction (``order`` has ``'norm'`` right after ``'conv'``): the pairs of a module
    that cannot be run on an example input. Without a forward pass nothing else is known,
    so the pairs are only as sure as the ``ConvModule`` 's own forward."""
    try:
        from mmcv.cnn import ConvModule
    except ImportError:  # pragma: no cover - mmcv is a dependency
        return []
    pairs = []
    for name, m in module.named_modules():
        if not isinstance(m, ConvModule) or not m.with_norm or any(
                is_mmreparam(p) and isinstance(p, Foldable) for p in (m.conv, m.norm)):
            continue
        order = list(m.order)
        if order.index('norm') != order.index('conv') + 1 or not isinstance(m.norm, _BatchNorm):
            continue
        prefix = f'{name}.' if name else ''
        problem = None
        if isinstance(m.conv, nn.Conv2d):
            problem = _conv_problem(m.conv) or _norm_problem(m.norm, m.conv)
        else:
            problem = f'{type(m.conv).__name__} is not an nn.Conv2d'
        pairs.append(ConvBNPair(f'{prefix}conv', f'{prefix}{m.norm_name}', problem))
    return pairs


__all__ = ['ConvBNPair', 'find_conv_bn_pairs', 'convmodule_pairs', 'call_module']
