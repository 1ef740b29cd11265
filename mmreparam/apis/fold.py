"""Fold every re-parameterizable module of any model into its deploy form."""
import contextlib
import copy
from typing import Any, Dict, Iterator

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ..models.layers.base import fold_tree


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every re-parameterizable module of ``model`` into plain convolutions.

    Folds mmreparam's blocks (every :class:`ReparamBlock`, and :class:`RepMLPBlock` into its
    FCs: the ``Foldable`` protocol) and other libraries' modules that
    expose ``switch_to_deploy()`` (mmpretrain, mmyolo) or ``reparameterize()`` (timm), in any
    model: a backbone, a detector, a segmentor or a classifier. The fold uses the eval-mode
    function of the BatchNorms; each module's train/eval flag is restored afterwards.

    Args:
        model (nn.Module): The model.
        inplace (bool): Fold ``model`` itself instead of a deep copy. Defaults to False.

    Returns:
        nn.Module: The folded model (``model`` itself when ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        count = fold_tree(model)
    for m in model.modules():
        m.training = modes.get(m, False)
    print_log(f'mmreparam.fold: folded {count} module(s) of {type(model).__name__}',
              logger='current')
    return model


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Yield the tensors of a (nested) model output, in a deterministic order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _tensors(obj[key])
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif hasattr(obj, 'to_dict'):  # mmengine data elements
        yield from _tensors(obj.to_dict())


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
@contextlib.contextmanager
def _full_fp32_on_cuda():
    """Turn off TF32 for CUDA convolutions and matrix products, restoring the flags after."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def fold_error(model: nn.Module, folded: nn.Module, inputs: Any) -> Dict[str, float]:
    """Compare the outputs of a model and its folded copy in eval mode.

    Both models run with TF32 off: on GPUs since Ampere, PyTorch's float32 convolutions
    round their operands to TF32 by default, which alone makes two equal ResNet-50s differ
    by ~1e-3 (measured on an H100); with it off the comparison measures the fold. The
    flags are restored afterwards.

    Args:
        model (nn.Module): The unfolded model.
        folded (nn.Module): The folded model.
        inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments.

    Returns:
        dict: ``max_abs``, the largest absolute difference over all output tensors, and
        ``max_rel``, that difference divided by the largest absolute reference output.
    """
    modes = [(m, m.training) for m in (*model.modules(), *folded.modules())]
    model.eval()
    folded.eval()
    try:
        with _full_fp32_on_cuda():
            ref = list(_tensors(_call(model, inputs)))
            out = list(_tensors(_call(folded, inputs)))
    finally:
        for m, mode in modes:
            m.training = mode
    if len(ref) != len(out) or not ref:
        raise ValueError(f'the models give different or no outputs ({len(ref)} vs '
                         f'{len(out)} tensors)')
    max_abs, scale = 0.0, 0.0
    for a, b in zip(ref, out):
        if a.shape != b.shape:
            raise ValueError(f'output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}')
        if not a.is_floating_point():
            max_abs = max(max_abs, float((a != b).any()))
            continue
        max_abs = max(max_abs, (a.double() - b.double()).abs().max().item())
        scale = max(scale, a.double().abs().max().item())
    return dict(max_abs=max_abs, max_rel=max_abs / scale if scale > 0 else max_abs)
