"""The fold check: does a folded model compute what the model computes?

:func:`fold_error` compares two models' outputs on an input, :func:`fold_error_on_batch`
an OpenMMLab model's parts on one batch of its dataloader (features, dense and RoI head
outputs, a two-stage detector's folded copy on the model's own proposals), both in eval
mode with TF32 off; :func:`check_fold` judges the error against a limit (the check of
:class:`~mmreparam.engine.FoldHook` and ``tools/fold.py``) and :func:`fold_check_messages`
words its result.
"""
import contextlib
import copy
import logging
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ..utils import describe_error


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


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    """Put the models in eval mode; restore every module's train/eval flag afterwards."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _compare(ref: List[Tensor], out: List[Tensor]) -> Dict[str, Any]:
    """The comparison of :func:`fold_error`, on two lists of output tensors."""
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
    with _eval_mode(model, folded), _full_fp32_on_cuda(), torch.no_grad():
        ref = list(_tensors(_call(model, inputs)))
        out = list(_tensors(_call(folded, inputs)))
    if not ref:
        raise ValueError('the model output holds no tensor to compare (it gave '
                         f'{len(out)} tensor(s) after the fold)')
    return _compare(ref, out)


@contextlib.contextmanager
def _same_proposals(model: nn.Module, folded: nn.Module):
    """Run a two-stage detector's folded copy on the model's own region proposals.

    A proposal list is ranked and cut by NMS: two near-tied proposals swap places under a
    rounding change of 1e-7, after which the RoI head outputs, compared row by row, differ
    by O(1) though the fold is exact. Inside this context, the model's
    ``rpn_head.predict`` results are recorded and the folded copy's ``rpn_head.predict``
    runs its RPN (the dense RPN outputs are compared) but returns the model's proposals.

    Yields:
        dict | None: ``{'ref': [...], 'out': [...]}``, the RPN heads' dense outputs (filled
        by the forward passes), or None for a model without an RPN (nothing is changed).
    """
    rpn, rpn_folded = getattr(model, 'rpn_head', None), getattr(folded, 'rpn_head', None)
    if (not isinstance(rpn, nn.Module) or not isinstance(rpn_folded, nn.Module)
            or rpn is rpn_folded or not callable(getattr(rpn, 'predict', None))):
        yield None
        return
    outputs: Dict[str, list] = dict(ref=[], out=[])
    proposals: list = []
    predict, predict_folded = rpn.predict, rpn_folded.predict

    def recording(*args, **kwargs):
        result = predict(*args, **kwargs)
        proposals.append(copy.deepcopy(result))
        return result

    def replaying(*args, **kwargs):
        predict_folded(*args, **kwargs)  # the folded RPN runs; its proposals are not used
        if not proposals:
            raise RuntimeError('the folded model asked for region proposals more often than '
                               'the model did')
        return proposals.pop(0)

    hooks = [rpn.register_forward_hook(lambda m, a, o: outputs['ref'].append(o)),
             rpn_folded.register_forward_hook(lambda m, a, o: outputs['out'].append(o))]
    saved = [(head, vars(head).get('predict')) for head in (rpn, rpn_folded)]
    rpn.predict, rpn_folded.predict = recording, replaying
    try:
        yield outputs
    finally:
        for head, own in saved:  # the class's method again, or what the instance had
            if own is None:
                del head.predict
            else:
                head.predict = own
        for hook in hooks:
            hook.remove()


def _features_label(model: nn.Module) -> str:
    return 'backbone + neck features' if getattr(model, 'with_neck', False) else \
        'backbone features'


def fold_error_on_batch(model: nn.Module, folded: nn.Module, batch: Any) -> Dict[str, Any]:
    """:func:`fold_error` of an OpenMMLab model on one batch of its dataloader, on what
    the fold can change.

    The batch goes through the model's ``data_preprocessor``; both models then run in eval
    mode, TF32 off, and these parts are compared, each by :func:`fold_error`'s rules and
    relative to its own largest value:

    - the features, ``extract_feat`` (backbone, and neck if any), when the model has it;
    - the model's outputs in ``mode='tensor'`` (logits, dense head outputs, RoI head
      outputs). For a two-stage detector, the RPN's dense outputs are compared, and the
      RoI head of the folded copy runs on the model's own proposals: which proposals NMS
      keeps, and in which order, may change under a rounding difference of an exact fold,
      and is not what the fold computes (see :func:`_same_proposals`).

    Output tensors that are empty (a barely trained detector may keep no proposal) are
    skipped, with a warning; when a model has no ``extract_feat``, its backbone is compared
    then.

    Args:
        model (nn.Module): The unfolded model (with ``data_preprocessor``).
        folded (nn.Module): Its folded copy.
        batch: One batch as the dataloader gives it (not changed).

    Returns:
        dict: As :func:`fold_error`'s, over all parts: ``max_abs`` and ``max_rel`` the
        largest of the parts', ``tensors`` and ``compared`` summed, ``mismatches`` prefixed
        with their part; plus ``parts``, ``{part: {'max_abs', 'max_rel'}}`` for the parts
        compared, and ``measured_on``, their names joined (e.g. ``'backbone + neck
        features, RPN outputs, RoI head outputs on the same proposals'``).

    Raises:
        ValueError: Nothing could be compared (no non-empty output, no backbone).
    """
    data = model.data_preprocessor(copy.deepcopy(batch), False)
    inputs, samples = data['inputs'], data.get('data_samples')
    parts: Dict[str, Tuple[list, list]] = {}
    with _eval_mode(model, folded), _full_fp32_on_cuda(), torch.no_grad():
        if callable(getattr(model, 'extract_feat', None)) and \
                callable(getattr(folded, 'extract_feat', None)):
            parts[_features_label(model)] = (list(_tensors(model.extract_feat(inputs))),
                                             list(_tensors(folded.extract_feat(inputs))))
        kwargs = dict(inputs=inputs, data_samples=samples, mode='tensor')
        with _same_proposals(model, folded) as rpn_outputs:
            outputs = list(_tensors(model(**kwargs))), list(_tensors(folded(**kwargs)))
        if rpn_outputs is not None:
            parts['RPN outputs'] = (list(_tensors(rpn_outputs['ref'])),
                                    list(_tensors(rpn_outputs['out'])))
            parts['RoI head outputs on the same proposals'] = outputs
        else:
            parts['model outputs'] = outputs
        results = {name: _compare(*pair) for name, pair in parts.items()}
        empty = [name for name, result in results.items() if result['compared'] == 0
                 and not result['mismatches']]
        if empty and len(empty) == len(results) and hasattr(model, 'backbone') and \
                hasattr(folded, 'backbone'):
            results['backbone outputs'] = _compare(list(_tensors(model.backbone(inputs))),
                                                   list(_tensors(folded.backbone(inputs))))
    measured = {name: r for name, r in results.items() if name not in empty}
    if not measured or all(r['compared'] == 0 and not r['mismatches']
                           for r in measured.values()):
        tensors = sum(r['tensors'] for r in results.values())
        raise ValueError(f'all {tensors} output tensor(s) are empty: nothing to compare')
    if empty:
        counts = ', '.join(f'{results[name]["tensors"]} {name}' for name in empty)
        print_log(f'mmreparam: the model\'s output tensor(s) are empty ({counts}; e.g. a '
                  'barely trained detector keeps no proposal); the fold error is measured on '
                  f'the {", ".join(measured)}', logger='current', level=logging.WARNING)
    return dict(
        max_abs=max(r['max_abs'] for r in measured.values()),
        max_rel=max(r['max_rel'] for r in measured.values()),
        tensors=sum(r['tensors'] for r in results.values()),
        compared=sum(r['compared'] for r in results.values()),
        mismatches=[f'{name}: {m}' for name, r in results.items() for m in r['mismatches']],
        parts={name: dict(max_abs=r['max_abs'], max_rel=r['max_rel'])
               for name, r in measured.items()},
        measured_on=', '.join(measured))


def check_fold(model: nn.Module, folded: nn.Module,
               load_batch: Callable[[], Tuple[str, Any]], max_rel_error: float = 1e-4,
               fallback_shape: Optional[Sequence[int]] = None
               ) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """Measure the fold error on a batch and judge it: the check of :class:`FoldHook` and
    ``tools/fold.py``. Never raises an ``Exception``.

    Args:
        model (nn.Module): The unfolded model (eval mode).
        folded (nn.Module): Its folded copy.
        load_batch (callable): Returns ``(what, batch)``: a description such as
            ``'a validation batch'`` and one batch of the model's dataloader.
        max_rel_error (float): The largest relative error accepted. Defaults to 1e-4.
        fallback_shape (tuple[int, int], optional): When no batch can be loaded or measured,
            compare the backbones on a random input of this size (H, W) instead. Defaults to
            None: the fold is then not checked.

    Returns:
        tuple[dict, dict | None]: The ``fold_check`` record that ``deploy.pth``'s meta holds
        (``status``: ``'passed'``, ``'failed'`` or ``'not measured'``; ``max_rel_error``;
        ``measured_on`` when measured; ``reason`` when not measured on a batch) and the
        measured error (:func:`fold_error_on_batch`'s, or :func:`fold_error`'s on the
        fallback), None when not measured. :func:`fold_check_messages` words them.
    """
    limit = float(max_rel_error)
    try:
        what, batch = load_batch()
        err = fold_error_on_batch(model, folded, batch)
        record = dict(measured_on=f'{what} ({err["measured_on"]})')
    except Exception as exc:
        reason = describe_error(exc)
        if fallback_shape is None:
            return dict(status='not measured', max_rel_error=limit, reason=reason), None
        where = f'the backbone on a random {fallback_shape[0]}x{fallback_shape[1]} input'
        try:
            x = torch.randn(1, 3, *fallback_shape)
            err = fold_error(getattr(model, 'backbone', model),
                             getattr(folded, 'backbone', folded), x)
        except Exception as exc2:
            return dict(status='not measured', max_rel_error=limit,
                        reason=f'{reason}; not on {where} either ({describe_error(exc2)})'), None
        record = dict(measured_on=where, reason=f'no batch ({reason})')
    status = 'passed' if err['max_rel'] <= limit else 'failed'
    return dict(status=status, max_rel_error=limit, **record), err


def fold_check_messages(record: Dict[str, Any],
                        err: Optional[Dict[str, Any]]) -> List[Tuple[int, str]]:
    """The log lines of a :func:`check_fold` result: ``[(level, message), ...]``.

    One INFO line with the error measured (or one WARNING saying why it was not), and, when
    the check failed, one ERROR line naming the parts above the limit.
    """
    limit = record['max_rel_error']
    if err is None:
        return [(logging.WARNING, f'could not measure the fold error ({record["reason"]}); '
                 'the fold is not checked')]
    messages = [(logging.INFO, f'fold error on {record["measured_on"]}: max abs '
                 f'{err["max_abs"]:.3g}, max rel {err["max_rel"]:.3g} (limit {limit:g})')]
    if record['status'] == 'failed':
        detail = fold_error_detail(err, limit)
        messages.append((logging.ERROR, f'the fold error {err["max_rel"]:.3g} is above '
                         f'max_rel_error={limit:g}' + (f' ({detail})' if detail else '')
                         + ': the folded model does not compute what the trained one '
                         'computes'))
    return messages


def fold_error_detail(err: Dict[str, Any], max_rel_error: float) -> str:
    """What a failed check found, in a few words: the first mismatches, and each part of
    :func:`fold_error_on_batch` whose error is above ``max_rel_error`` with that error."""
    above = [f'{name} {part["max_rel"]:.3g}' for name, part in err.get('parts', {}).items()
             if part['max_rel'] > max_rel_error]
    return '; '.join(err.get('mismatches', [])[:3] + above)
