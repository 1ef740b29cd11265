"""Fold every re-parameterizable module of any model into its deploy form."""
import contextlib
import copy
import logging
import math
from typing import Any, Dict, Iterator, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ..models.layers.base import fold_tree, foreign_fold_problem
from .upstream import restore_upstream


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every re-parameterizable module of ``model`` into plain convolutions.

    Folds mmreparam's blocks (every :class:`ReparamBlock`, and :class:`RepMLPBlock` into its
    FCs: the ``Foldable`` protocol) and other libraries' modules that
    expose ``switch_to_deploy()`` (mmpretrain, mmyolo) or ``reparameterize()`` (timm), in any
    model: a backbone, a detector, a segmentor or a classifier. The blocks that
    :func:`mmreparam.reparameterize` put into a model become the original conv and BN again
    (upstream classes and state_dict keys; see
    :func:`~mmreparam.apis.upstream.restore_upstream`). The fold uses the eval-mode
    function of the BatchNorms; each module's train/eval flag is restored afterwards.

    Args:
        model (nn.Module): The model.
        inplace (bool): Fold ``model`` itself instead of a deep copy. Defaults to False.

    Returns:
        nn.Module: The folded model (``model`` itself when ``inplace``).

    Raises:
        ValueError: ``model`` holds another library's module whose own fold is known to
            change its function (:func:`~mmreparam.models.layers.base.foreign_fold_problem`);
            nothing is folded then.
    """
    for module in model.modules():
        problem = foreign_fold_problem(module)
        if problem:
            raise ValueError(problem)
    if not inplace:
        model = copy.deepcopy(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        count = fold_tree(model)
        restore_upstream(model)  # blocks put in by reparameterize(): upstream classes back
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


def _difference(a: Tensor, b: Tensor) -> Tuple[float, float]:
    """``(largest |a - b|, largest finite |a|)`` of two same-shaped float tensors, in float64.

    Equal values (NaN against NaN and equal infinities included) differ by 0; any other
    pair with a non-finite member differs by infinity.
    """
    a, b = a.detach().double(), b.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs().nan_to_num(nan=math.inf))
    finite = a[torch.isfinite(a)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return diff.max().item(), scale


def fold_error(model: nn.Module, folded: nn.Module, inputs: Any) -> Dict[str, Any]:
    """Compare the outputs of a model and its folded copy in eval mode.

    Both models run with TF32 off: on GPUs since Ampere, PyTorch's float32 convolutions
    round their operands to TF32 by default, which alone makes two equal ResNet-50s differ
    by ~1e-3 (measured on an H100); with it off the comparison measures the fold. The
    flags are restored afterwards.

    Every output tensor is compared with its counterpart: floating-point ones by value,
    integer and bool ones by equality (a difference counts 1), empty ones by shape (a
    barely trained detector may keep no proposal). Outputs that do not correspond (another
    number of tensors, another shape) are listed in ``mismatches`` and make the error
    infinite: the models do not compute the same function.

    Args:
        model (nn.Module): The unfolded model.
        folded (nn.Module): The folded model.
        inputs: A tensor, a tuple of positional arguments or a dict of keyword arguments.

    Returns:
        dict: ``max_abs``, the largest absolute difference over all output tensors;
        ``max_rel``, that difference divided by the largest finite absolute reference
        output (``max_abs`` itself when that is 0); ``tensors``, the number of output
        tensors; ``compared``, how many of them had elements to compare; ``mismatches``,
        descriptions of the outputs that do not correspond (empty when all do).

    Raises:
        ValueError: The model's output holds no tensor at all (nothing to compare).
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
    if not ref:
        raise ValueError('the model output holds no tensor to compare (it gave '
                         f'{len(out)} tensor(s) after the fold)')
    mismatches = []
    if len(ref) != len(out):
        mismatches.append(f'{len(ref)} output tensors before the fold, {len(out)} after')
    max_abs, scale, compared = 0.0, 0.0, 0
    for i, (a, b) in enumerate(zip(ref, out)):
        if a.shape != b.shape:
            mismatches.append(f'output {i}: shape {tuple(a.shape)} vs {tuple(b.shape)}')
            continue
        if a.numel() == 0:
            continue
        compared += 1
        if not a.is_floating_point():
            max_abs = max(max_abs, float(torch.ne(a, b.to(a.dtype)).any()))
            continue
        diff, ref_scale = _difference(a, b)
        max_abs, scale = max(max_abs, diff), max(scale, ref_scale)
    if mismatches:
        max_abs = math.inf
    return dict(max_abs=max_abs, max_rel=max_abs / scale if scale > 0 else max_abs,
                tensors=len(ref), compared=compared, mismatches=mismatches)


def fold_error_on_batch(model: nn.Module, folded: nn.Module, batch: Any) -> Dict[str, Any]:
    """:func:`fold_error` of an OpenMMLab model on one batch of its dataloader.

    The batch goes through the model's ``data_preprocessor`` and both models run in
    ``mode='tensor'``. When all of the model's output tensors are empty (a barely trained
    detector may keep no proposal), the backbones are compared instead, on the same
    inputs: the fold changes nothing after them.

    Args:
        model (nn.Module): The unfolded model (with ``data_preprocessor``).
        folded (nn.Module): Its folded copy.
        batch: One batch as the dataloader gives it (not changed).

    Returns:
        dict: The result of :func:`fold_error`, plus ``measured_on``: ``'model outputs'``
        or ``'backbone outputs'``.

    Raises:
        ValueError: Nothing could be compared (no non-empty output, no backbone).
    """
    data = model.data_preprocessor(copy.deepcopy(batch), False)
    err = fold_error(model, folded, dict(inputs=data['inputs'],
                                         data_samples=data.get('data_samples'), mode='tensor'))
    err['measured_on'] = 'model outputs'
    if err['compared'] == 0 and hasattr(model, 'backbone') and hasattr(folded, 'backbone'):
        print_log(f'mmreparam: the model\'s {err["tensors"]} output tensor(s) are empty; '
                  'comparing the backbones\' outputs instead', logger='current',
                  level=logging.WARNING)
        err = dict(fold_error(model.backbone, folded.backbone, data['inputs']),
                   measured_on='backbone outputs')
    if err['compared'] == 0:
        raise ValueError(f'all {err["tensors"]} output tensor(s) are empty: nothing to compare')
    return err
