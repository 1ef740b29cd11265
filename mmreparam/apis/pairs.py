"""Finding the conv -> BatchNorm pairs of any model by following its data.

A convolution and a BatchNorm form a pair when, in a forward pass, the BatchNorm's input is
the convolution's output and nothing else uses that output. This is found by running the
model once on an example input with module hooks (which module runs, what it returns) and a
``TorchFunctionMode`` (every torch operation and the tensors it reads), not from attribute
names: it works for mmcv's ``ConvModule``, for ``convN`` / ``normN`` attribute pairs
(mmdet's ResNet family, RegNet, HRNet), ``nn.Sequential`` pairs and timm-style modules
alike. :func:`mmreparam.reparameterize` turns the pairs into re-param blocks;
:func:`~mmreparam.apis.fuse_pairs.fuse_conv_bn_pairs` (``mmreparam.fold(..., fuse_bn=True)``)
merges them into the conv.
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

from ..models.layers.base import Foldable
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


def _adaptive_padding_forward() -> Any:
    try:  # TensorFlow's "same" padding, as mmpretrain's EfficientNet uses it
        from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
    except ImportError:  # pragma: no cover - mmcv is a dependency
        return None
    return Conv2dAdaptivePadding.forward


def _adaptive_padding_problem(conv: nn.Module) -> Optional[str]:
    """Why an mmcv ``Conv2dAdaptivePadding`` is not a conv with a fixed zero padding.

    Its forward pads ``(k - 1) * dilation`` pixels in all (at stride 1), half on each side,
    the extra pixel of an odd total at the end: a fixed symmetric padding when that total
    is even. At stride 2 the padding depends on the input size.
    """
    if any(s != 1 for s in conv.stride):
        return (f'{type(conv).__name__} at stride {conv.stride[0]} pads by the input size '
                '(no fixed padding)')
    if any((k - 1) * d % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        return f'{type(conv).__name__} pads an even kernel asymmetrically'
    if any(conv.padding):
        return f'{type(conv).__name__} with a padding of its own'
    return None


def fixed_padding_view(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` itself, or for a conv that pads in its forward with a fixed zero padding (an
    mmcv ``Conv2dAdaptivePadding`` at stride 1 with an odd kernel) a shape-only
    (``meta``) plain ``nn.Conv2d`` with that padding: what a block replacing it must be."""
    if type(conv).forward is not _adaptive_padding_forward():
        return conv
    view = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     tuple((k - 1) * d // 2 for k, d in zip(conv.kernel_size, conv.dilation)),
                     conv.dilation, conv.groups, conv.bias is not None, device='meta')
    return view


@dataclass
class ConvBNPair:
    """A convolution whose output goes into a BatchNorm (or, with ``kind``, a linear layer
    whose output goes into a BatchNorm, or a BatchNorm whose output goes into a conv or a
    linear layer).

    Attributes:
        conv (str): The convolution's (or linear layer's) path in the searched module
            (``named_modules``).
        norm (str): The BatchNorm's path.
        problem (str, optional): Why the two cannot be merged (the first one's output is
            used elsewhere as well, a module runs more than once, the BN has no running
            statistics, ...); None when they can.
        kind (str): ``'conv-bn'`` (the default: the only kind unless
            :func:`find_conv_bn_pairs` is asked for more), ``'linear-bn'``, ``'bn-conv'`` or
            ``'bn-linear'``: which layer comes first.
    """
    conv: str
    norm: str
    problem: Optional[str] = None
    kind: str = 'conv-bn'

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

    def __init__(self, root: nn.Module, more: bool = False):
        super().__init__()
        self.more = more
        self.layer_inputs: Dict[nn.Module, List[nn.Module]] = {}  # conv / linear -> BNs
        self.ndims: Dict[nn.Module, int] = {}  # BN -> ndim of its input
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
            if isinstance(module, Foldable):
                skip.update(m for m in module.modules() if m is not module)
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))
        self.skip = skip

    def _enter(self, module: nn.Module, args) -> None:
        self.stack.append(module)
        self.calls[module] = self.calls.get(module, 0) + 1
        if module in self.skip or not args:
            return
        source = self.outputs.get(id(args[0]))
        if source is None or source[1] is not args[0]:
            return
        if isinstance(module, _BatchNorm) and isinstance(source[0], (nn.Conv2d, nn.Linear)):
            self.norm_inputs.setdefault(module, []).append(source[0])
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(source[0], _BatchNorm):
            self.layer_inputs.setdefault(module, []).append(source[0])

    def _leave(self, module: nn.Module, args, output) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        kinds = (nn.Conv2d, nn.Linear, _BatchNorm) if self.more else nn.Conv2d
        if isinstance(module, kinds) and module not in self.skip \
                and isinstance(output, Tensor):
            self.outputs[id(output)] = (module, output)  # keeps the tensor (and its id) alive
            if isinstance(module, _BatchNorm):
                self.ndims[module] = output.dim()

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


def _conv_problem(conv: nn.Module) -> Optional[str]:
    if isinstance(conv, nn.Linear):
        if type(conv).forward is not nn.Linear.forward:
            return f'{type(conv).__name__} is not a plain linear layer (its own forward)'
        return None
    if type(conv).forward is _adaptive_padding_forward():
        return _adaptive_padding_problem(conv)
    if type(conv).forward not in _plain_conv_forwards():
        return f'{type(conv).__name__} is not a plain convolution (its own forward)'
    return None


def _norm_problem(norm: _BatchNorm, conv: nn.Module, kind: str = 'conv-bn',
                  ndim: int = 4) -> Optional[str]:
    if type(norm).forward not in _PLAIN_BN_FORWARDS:
        return f'{type(norm).__name__} is not a plain BatchNorm (its own forward)'
    if norm.running_mean is None or norm.running_var is None:
        return f'{type(norm).__name__} has no running statistics (track_running_stats=False)'
    linear = isinstance(conv, nn.Linear)
    if kind.startswith('bn'):
        channels = conv.in_features if linear else conv.in_channels
        what = 'inputs'
    else:
        channels = conv.out_features if linear else conv.out_channels
        what = 'outputs'
    if norm.num_features != channels:
        return (f'{type(norm).__name__} has {norm.num_features} features for {channels} '
                f'{"linear" if linear else "conv"} {what}')
    if linear and ndim != 2:
        return (f'the BatchNorm normalizes a {ndim}-d tensor along dim 1; the linear layer '
                'acts on the last dim')
    if kind == 'bn-conv' and any(conv.padding if isinstance(conv.padding, tuple)
                                 else [conv.padding != 'valid']):
        return ('the conv pads its input, and a BN folded into it would change the padded '
                'values')
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


def find_conv_bn_pairs(module: nn.Module, inputs: Sequence[Any],
                       more: bool = False) -> List[ConvBNPair]:
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
        more (bool): Also find ``nn.Linear`` -> BN pairs (the linear output 2-d: ``(N, C)``)
            and BN -> conv / linear pairs (the BN the only user of its output; a conv
            without padding, a linear layer on a 2-d input), by the same rules. Defaults to
            False: conv -> BN pairs only (what :func:`mmreparam.reparameterize` takes).

    Returns:
        list[ConvBNPair]: Every conv -> BN connection found, mergeable or not, in the order
        the convs ran (the BN -> layer pairs after them, in the order the BNs ran).
    """
    tracer = _Tracer(module, more)
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
            kind = 'linear-bn' if isinstance(conv, nn.Linear) else 'conv-bn'
            pairs.append((conv, ConvBNPair(tracer.paths[conv], tracer.paths[norm], problem,
                                           kind)))
    for layer, norms in tracer.layer_inputs.items():
        for norm in norms:
            kind = 'bn-linear' if isinstance(layer, nn.Linear) else 'bn-conv'
            problem = _pair_problem(tracer, layer, norm, len(norms), kind)
            pairs.append((norm, ConvBNPair(tracer.paths[layer], tracer.paths[norm], problem,
                                           kind)))
    order = {conv: i for i, (conv, _) in enumerate(tracer.outputs.values())}
    pairs.sort(key=lambda item: (item[1].kind.startswith('bn'), order.get(item[0], 0)))
    return [pair for _, pair in pairs]


def _pair_problem(tracer: _Tracer, conv: nn.Module, norm: _BatchNorm,
                  sources: int, kind: Optional[str] = None) -> Optional[str]:
    kind = kind or ('linear-bn' if isinstance(conv, nn.Linear) else 'conv-bn')
    layer = 'linear layer' if isinstance(conv, nn.Linear) else 'conv'
    runs_conv, runs_norm = tracer.calls.get(conv, 0), tracer.calls.get(norm, 0)
    if runs_conv != 1 or runs_norm != 1 or sources != 1:
        return (f'the {layer} runs {runs_conv} times and the BatchNorm {runs_norm} times in '
                'one forward pass (shared modules)')
    first, second = (norm, conv) if kind.startswith('bn') else (conv, norm)
    others = [what for what, stack in tracer.uses.get(first, []) if second not in stack]
    if others:
        owner = 'BatchNorm' if kind.startswith('bn') else layer
        return (f'the {owner}\'s output is used elsewhere too '
                f'({", ".join(sorted(set(others)))})')
    ndim = tracer.ndims.get(norm, 4)
    return _conv_problem(conv) or _norm_problem(norm, conv, kind, ndim)


def _first_conv(module: nn.Module) -> Optional[nn.Conv2d]:
    return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)


def _reference_tensor(module: nn.Module) -> Tensor:
    tensor = next(module.parameters(), None)
    return tensor if tensor is not None else torch.zeros(())


def example_inputs(module: nn.Module, size: int = 64) -> List[Tuple[Any, ...]]:
    """Candidate example inputs of a backbone or a neck, from its structure.

    A module whose ``in_channels`` is a list (a neck: FPN, PAFPN, ...) gets one feature map
    per entry, as one tuple argument, from ``max(2, size // 32)`` pixels for the last up to
    twice that for each level before. Another (a backbone) gets a ``size x size`` image
    batch of one with the input channels of its first convolution, its ``in_channels`` (an
    int attribute; some backbones keep another meaning under that name), or 3 (a first
    convolution may see a transformed image, as after YOLOX's Focus). Device and dtype
    follow the module's parameters.

    Returns:
        list[tuple]: Positional arguments to try, in turn.
    """
    ref = _reference_tensor(module)
    like = dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    in_channels = getattr(module, 'in_channels', None)
    if isinstance(in_channels, (list, tuple)) and in_channels \
            and all(isinstance(c, int) for c in in_channels):
        smallest = max(2, size // 32)
        count = len(in_channels)
        sizes = [smallest * 2**(count - 1 - i) for i in range(count)]
        return [(tuple(torch.randn(1, c, s, s, **like) for c, s in zip(in_channels, sizes)), )]
    conv = _first_conv(module)
    if conv is None:
        raise ValueError(f'{type(module).__name__} has no nn.Conv2d: nothing to '
                         're-parameterize')
    channels = [conv.in_channels]
    for more in (in_channels, 3):  # 3: an RGB image, when the first conv sees another input
        if isinstance(more, int) and more not in channels:
            channels.append(more)
    return [(torch.randn(1, c, size, size, **like), ) for c in channels]


def search_pairs(module: nn.Module, inputs: Any = None,
                 sizes: Sequence[int] = (32, 64, 128, 256), more: bool = False
                 ) -> Tuple[List[ConvBNPair], Any]:
    """:func:`find_conv_bn_pairs` on ``inputs``, or, when None, on the first candidate of
    :func:`example_inputs` (for each of ``sizes`` in turn) that runs.

    Args:
        module (nn.Module): The module to search.
        inputs (Tensor | tuple | dict, optional): Its inputs (a tensor is one positional
            argument). Defaults to None.
        sizes (Sequence[int]): Example image sizes to try when ``inputs`` is None.
        more (bool): See :func:`find_conv_bn_pairs`. Defaults to False.

    Returns:
        tuple[list[ConvBNPair], tuple | dict]: The pairs and the inputs they were found with.

    Raises:
        ValueError: ``inputs`` is None and no example input runs (or ``module`` has no
            ``nn.Conv2d``).
    """
    if inputs is not None:
        inputs = inputs if isinstance(inputs, (tuple, list, dict)) else (inputs, )
        return find_conv_bn_pairs(module, inputs, more), inputs
    errors = []
    for size in sizes:
        for inputs in example_inputs(module, size):
            try:
                return find_conv_bn_pairs(module, inputs, more), inputs
            except Exception as err:  # noqa: BLE001 - another input may run; all fail below
                errors.append(f'{size}px: {type(err).__name__}: {err}')
    raise ValueError(f'could not run {type(module).__name__} on an example input to follow '
                     f'its data ({"; ".join(errors)}); pass example_inputs=')


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
                isinstance(p, Foldable) for p in (m.conv, m.norm)):
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


__all__ = ['ConvBNPair', 'find_conv_bn_pairs', 'convmodule_pairs', 'call_module',
           'example_inputs', 'search_pairs']
