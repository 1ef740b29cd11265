"""Fusing the conv -> BatchNorm pairs that :mod:`mmreparam.apis.pairs` finds.

:func:`fuse_conv_bn_pairs` (``mmreparam.fold(..., fuse_bn=True)``) folds each mergeable
pair's BatchNorm into its conv or linear layer (either side of it), :func:`unfused_pairs`
and :func:`describe_pair` name what is left, and :func:`fused_structure` /
:func:`build_fused_bn` (registered as ``mmreparam.FusedBN``) rebuild the structure that a
fused deploy checkpoint loads into.
"""
import copy
from typing import List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers.fuse import bn_scale_shift
from ..registry import MODELS
from .pairs import ConvBNPair


def _fused_weights(layer: nn.Module, norm: _BatchNorm, kind: str) -> Tuple[Tensor, Tensor]:
    """The kernel and bias (float64) of ``layer`` with ``norm`` folded in, before
    (``kind`` ``'bn-*'``) or after it."""
    weight = layer.weight.double()
    bias = layer.bias.double() if layer.bias is not None else weight.new_zeros(weight.shape[0])
    scale, shift = bn_scale_shift(norm, dtype=torch.float64)
    tail = [1] * (weight.dim() - 2)
    if kind.startswith('bn'):  # W (a x + b) + c = (W a) x + (W b + c), per input channel
        groups = getattr(layer, 'groups', 1)
        per_group = weight.shape[1]
        rows = torch.arange(weight.shape[0], device=weight.device) // (weight.shape[0] // groups)
        scale = scale.reshape(groups, per_group)[rows].reshape(*weight.shape[:2], *tail)
        shift = shift.reshape(groups, per_group)[rows].reshape(*weight.shape[:2], *tail)
        return weight * scale, bias + (weight * shift).flatten(1).sum(1)
    return weight * scale.reshape(-1, 1, *tail), bias * scale + shift


def fuse_conv_bn_pairs(module: nn.Module, pairs: Sequence[ConvBNPair]) -> List[ConvBNPair]:
    """Fuse each mergeable pair of ``module`` in place: the conv (or linear layer) gets the
    BN's eval-mode affine map folded into its kernel and bias, the BN becomes
    ``nn.Identity``.

    A conv -> BN pair gives ``W' = W * g / sqrt(v + eps)``,
    ``b' = beta + (b - m) * g / sqrt(v + eps)``; a BN -> layer pair (``kind`` ``'bn-conv'``,
    ``'bn-linear'``) scales the layer's input channels and adds the kernel applied to the
    BN's shift to the bias (exact only without padding, which the finder checks). Computed
    in float64, stored in the layer's dtype. Conv -> BN pairs come first; a BN fused into
    the layer before it is not fused again into the one after it. ``module`` computes its
    eval-mode function as before; its ``state_dict`` keys change (the BN's entries are
    gone, the layer has a ``bias``): the fused model is a deploy model, not one that loads
    into its class's upstream config (:func:`build_fused_bn` builds one that does).

    Args:
        module (nn.Module): The module the pairs were found in (:func:`find_conv_bn_pairs`).
        pairs (Sequence[ConvBNPair]): Its pairs; those with a ``problem`` are skipped.

    Returns:
        list[ConvBNPair]: The pairs fused.
    """
    fused, norms = [], set()
    for pair in sorted(pairs, key=lambda p: p.kind.startswith('bn')):
        if not pair.mergeable or pair.norm in norms:
            continue
        layer, norm = module.get_submodule(pair.conv), module.get_submodule(pair.norm)
        with torch.no_grad():
            weight, bias = _fused_weights(layer, norm, pair.kind)
            grad = layer.weight.requires_grad
            layer.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=grad)
            layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=grad)
        parent, _, name = pair.norm.rpartition('.')
        identity = nn.Identity()
        identity.training = norm.training
        setattr(module.get_submodule(parent) if parent else module, name, identity)
        fused.append(pair)
        norms.add(pair.norm)
    return fused


def unfused_pairs(pairs: Sequence[ConvBNPair],
                  fused: Sequence[ConvBNPair]) -> List[ConvBNPair]:
    """The pairs that cannot be fused and whose BN was not fused in another pair either:
    what is left that looked foldable."""
    norms = {pair.norm for pair in fused}
    return [pair for pair in pairs if not pair.mergeable and pair.norm not in norms]


def describe_pair(pair: ConvBNPair) -> str:
    """``'first -> second (problem)'``, the two paths in data order."""
    first, second = (pair.norm, pair.conv) if pair.kind.startswith('bn') else \
        (pair.conv, pair.norm)
    return f'{first} -> {second}' + (f' ({pair.problem})' if pair.problem else '')


def fused_structure(module: nn.Module, pairs: Sequence[Sequence[str]]) -> nn.Module:
    """Give ``module`` the structure that :func:`fuse_conv_bn_pairs` leaves, in place: for
    each ``(conv, norm)`` path pair (a conv or linear layer, either side of its BN), the BN
    becomes ``nn.Identity`` and a layer without a bias gets a zero one. The weights are not
    fused (that is what loading a fused ``state_dict`` does next): this builds the model
    that a fused deploy checkpoint loads into.

    Args:
        module (nn.Module): The unfused model, built from its config.
        pairs (Sequence[Sequence[str]]): ``(conv path, BN path)`` of each fused pair.

    Returns:
        nn.Module: ``module``.

    Raises:
        ValueError: A path names no convolution / BatchNorm of ``module``.
    """
    for conv_path, norm_path in pairs:
        try:
            conv, norm = module.get_submodule(conv_path), module.get_submodule(norm_path)
        except AttributeError as exc:
            raise ValueError(f'{type(module).__name__} has no fused pair {conv_path} -> '
                             f'{norm_path} ({exc})') from None
        if not isinstance(conv, (nn.Conv2d, nn.Linear)) or \
                not isinstance(norm, (_BatchNorm, nn.Identity)):
            raise ValueError(f'{conv_path} / {norm_path} of {type(module).__name__} is a '
                             f'{type(conv).__name__} / {type(norm).__name__}, not a conv or '
                             'linear layer and a BatchNorm')
        if conv.bias is None:
            conv.bias = nn.Parameter(conv.weight.new_zeros(conv.weight.shape[0]),
                                     requires_grad=conv.weight.requires_grad)
        parent, _, name = norm_path.rpartition('.')
        setattr(module.get_submodule(parent) if parent else module, name, nn.Identity())
    return module


@MODELS.register_module(name='FusedBN')
def build_fused_bn(model: dict, pairs: Sequence[Sequence[str]]) -> nn.Module:
    """Build ``model`` through the registry and give it the fused structure of ``pairs``
    (:func:`fused_structure`): the deploy config of a model whose conv -> BN pairs were
    fused (``tools/fold.py --fuse-bn``), so that its ``deploy.pth`` loads strictly.

    Registered as ``mmreparam.FusedBN``; returns the built model itself (no extra level in
    the ``state_dict`` keys)::

        model = dict(type='mmreparam.FusedBN', pairs=[['backbone.conv1', 'backbone.bn1']],
                     model=dict(type='ImageClassifier', ...))

    Args:
        model (dict): The model's config (an unscoped type resolves in the default scope).
        pairs (Sequence[Sequence[str]]): ``(conv path, BN path)`` of each fused pair.

    Returns:
        nn.Module: The built model, fused in structure.
    """
    if not isinstance(model, Mapping) or 'type' not in model:
        raise ValueError(f'mmreparam.FusedBN needs model=dict(type=..., ...), got {model!r}')
    return fused_structure(MODELS.build(copy.deepcopy(model)), pairs)


__all__ = ['fuse_conv_bn_pairs', 'fused_structure', 'unfused_pairs', 'describe_pair',
           'build_fused_bn']
