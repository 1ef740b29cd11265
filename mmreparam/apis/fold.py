"""Fold every re-parameterizable module of any model into its deploy form.

The check that a fold is exact (:func:`fold_error`, :func:`check_fold`, ...) lives in
:mod:`mmreparam.apis.fold_check`; its public names are re-exported here for the old import
paths.
"""
import copy
import logging
from typing import Any, Dict, List

import torch
import torch.nn as nn
from mmengine.logging import print_log

from ..errors import ForeignFoldError
from ..models.layers.foreign import (
    FoldFailure,
    describe_failures,
    fold_module,
    foreign_fold_problem,
)
from .fold_check import (  # noqa: F401 - re-exported: mmreparam.apis.fold.check_fold, ...
    check_fold,
    fold_check_messages,
    fold_error,
    fold_error_detail,
    fold_error_on_batch,
)
from .fuse_pairs import describe_pair, fuse_conv_bn_pairs, unfused_pairs
from .pairs import ConvBNPair, search_pairs
from .surgery import restore_upstream


def fold(model: nn.Module, inplace: bool = False, strict: bool = False, *,
         fuse_bn: bool = False, example_inputs: Any = None) -> nn.Module:
    """Fold every re-parameterizable module of ``model`` into plain convolutions.

    Folds mmreparam's blocks (every :class:`ReparamBlock`, and :class:`RepMLPBlock` into its
    FCs: the ``Foldable`` protocol) and other libraries' modules through their own fold
    methods (:data:`~mmreparam.models.layers.foreign.FOREIGN_FOLDS`: ``switch_to_deploy``,
    ``reparameterize``, ``merge_kernel``, ``local_inject`` in place, ``fuse`` by
    replacement; mmpretrain, mmyolo, timm), in any model: a backbone, a detector, a
    segmentor or a classifier. A foreign module whose markers say it is in deploy form
    (built so, or folded before) is left alone, so folding twice changes nothing. The fold
    uses the eval-mode function of the BatchNorms; each module's train/eval flag is
    restored afterwards (a module that replaced another takes its parent's).

    A foreign method that raises leaves its module as it was; fold then logs one WARNING
    naming the module paths and the errors (``strict=True`` raises instead). The blocks
    that :func:`mmreparam.reparameterize` put into a model become the original conv and BN
    again (upstream classes and state_dict keys; see
    :func:`~mmreparam.apis.surgery.restore_upstream`).

    With ``fuse_bn=True`` the folded model is then run once on ``example_inputs`` to find
    its conv -> BatchNorm, linear -> BatchNorm and BatchNorm -> conv / linear pairs by
    following the data (:func:`~mmreparam.apis.pairs.find_conv_bn_pairs` with
    ``more=True``, the search of :func:`mmreparam.reparameterize`); each pair whose first
    module's output only the second one uses is fused (the conv or linear layer gets the
    BN's eval-mode affine map in its kernel and bias, the BN becomes ``nn.Identity``:
    :func:`~mmreparam.apis.fuse_pairs.fuse_conv_bn_pairs`; a BN before a conv only when the conv
    has no padding). The ``state_dict`` keys change then (no BN entries, layer biases): a
    deploy model that no longer loads into its upstream class. The pairs that the search
    found but cannot fuse (the output is used elsewhere too, shared modules, a BN without
    running statistics, a padded conv after the BN) and whose BN stays are named in the
    same WARNING (or error, with ``strict``). Off by default: it changes the model's
    structure and keys, and needs an input to run the model on.

    Args:
        model (nn.Module): The model.
        inplace (bool): Fold ``model`` itself instead of a deep copy. Defaults to False.
            When ``model`` itself is replaced by its own ``fuse()``, the returned module is
            the folded one.
        strict (bool): Raise when something is left unfolded instead of warning. With
            ``inplace``, a copy is folded first, so that nothing is changed when it raises.
            Defaults to False.
        fuse_bn (bool): Also fuse the conv -> BN pairs (see above). Defaults to False.
        example_inputs (Tensor | tuple | dict, optional): What to run the model on for
            ``fuse_bn`` (a tensor: one positional argument; a dict: keyword arguments).
            None builds an image (or a neck's feature maps) from the model's structure
            (:func:`~mmreparam.apis.pairs.example_inputs`), which fits a backbone or a
            neck, not a detector. Defaults to None.

    Returns:
        nn.Module: The folded model (``model`` itself when ``inplace``, unless replaced).

    Raises:
        TypeError: ``model`` is not a module (e.g. None: the ``train()`` override of
            mmpretrain's backbones returns None, so ``fold(backbone.eval())`` passes None).
        ValueError: ``model`` holds another library's module whose own fold is known to
            change its function (:func:`~mmreparam.models.layers.foreign.foreign_fold_problem`);
            nothing is folded then.
        ForeignFoldError: ``strict`` and a foreign fold method raised, or ``fuse_bn`` and
            a conv -> BN pair cannot be fused.
        ValueError: ``fuse_bn`` without ``example_inputs`` and no example input runs.
    """
    if not isinstance(model, nn.Module):
        hint = (': mmpretrain backbones\' train() (and so eval()) return None, so '
                'fold(backbone.eval()) passes None; call backbone.eval() first, then '
                'fold(backbone)') if model is None else ''
        raise TypeError(f'mmreparam.fold() needs an nn.Module, got {type(model).__name__}'
                        f'{hint}')
    for module in model.modules():
        problem = foreign_fold_problem(module)
        if problem:
            raise ValueError(problem)
    if strict and inplace:
        # raises before anything changes
        _fold_copy(copy.deepcopy(model), True, fuse_bn, example_inputs)
    if not inplace:
        model = copy.deepcopy(model)
    return _fold_copy(model, strict, fuse_bn, example_inputs)


def _fold_copy(model: nn.Module, strict: bool, fuse_bn: bool = False,
               example_inputs: Any = None) -> nn.Module:
    """Fold ``model`` in place (see :func:`fold`); return the folded model."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    failures: List[FoldFailure] = []
    with torch.no_grad():
        folded, count = fold_module(model, '', failures)
        restore_upstream(folded)  # blocks put in by reparameterize(): upstream classes back
    left: List[ConvBNPair] = []
    fused = 0
    if fuse_bn:
        pairs, _ = search_pairs(folded, example_inputs, more=True)
        fused_pairs = fuse_conv_bn_pairs(folded, pairs)
        fused = len(fused_pairs)
        left = unfused_pairs(pairs, fused_pairs)
    _restore_modes(folded, modes, modes[model])
    name = type(model).__name__
    unfolded = describe_failures(failures) if failures else ''
    unfused = '; '.join(describe_pair(pair) for pair in left)
    if strict and (failures or left):
        raise ForeignFoldError('; '.join(
            ([f'{len(failures)} module(s) of {name} cannot be folded: {unfolded}']
             if failures else []) +
            ([f'{len(left)} BN pair(s) of {name} cannot be fused: {unfused}']
             if left else [])))
    if failures or left:
        print_log('mmreparam.fold: ' + '; '.join(
            ([f'{len(failures)} module(s) of {name} left unfolded (their own fold method '
              f'failed; each is as it was): {unfolded}'] if failures else []) +
            ([f'{len(left)} BN pair(s) of {name} left unfused: {unfused}']
             if left else [])), logger='current', level=logging.WARNING)
    print_log(f'mmreparam.fold: folded {count} module(s) of {type(model).__name__}'
              + (f', fused {fused} BN pair(s)' if fuse_bn else ''), logger='current')
    return folded


def _restore_modes(module: nn.Module, modes: Dict[nn.Module, bool], parent: bool) -> None:
    """Give each module its train/eval flag from ``modes``; a new one takes its parent's."""
    module.training = modes.get(module, parent)
    for child in module.children():
        _restore_modes(child, modes, module.training)
