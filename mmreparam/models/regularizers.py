"""The equivalent-kernel L2 regularizer: weight decay on the kernel a block folds into.

Ordinary weight decay shrinks every branch of a re-parameterizable block on its own, but
what is deployed (and quantized, when QAT or PTQ follows the fold) is the one kernel the
branches fold into. This module penalises that kernel instead::

    loss_eq_l2 = weight * sum over blocks b of ||K_b||^2

where ``K_b`` is the kernel returned by ``b.get_equivalent_kernel_bias()`` (the squared
Frobenius norm; the bias is not penalised) and the sum runs over the outermost
:class:`~mmreparam.models.layers.ReparamBlock` of the model that are not folded and have a
trainable parameter.

Relation to the official code. RepVGG's ``get_custom_L2`` (DingXiaoH/RepVGG, ``repvgg.py``
and ``repvggplus_custom_L2.py``) penalises, for a ``3x3 + 1x1`` block with BN scales
``t3 = gamma3 / sqrt(var3 + eps)`` and ``t1`` (both detached), the outer ring of the raw
``3x3`` weight with plain L2 and the centre tap of the equivalent kernel normalised by the
branch scales, ``(t3 * K3_centre + t1 * K1)^2 / (t3^2 + t1^2)``; its comment asks to add
``0.5 * weight_decay * L2`` to the loss and to drop the optimizer's decay on the two conv
weights. That normalisation needs, for every tap of the kernel, the BN scales of the
branches that cover it: RepVGG's two-branch structure gives them, a generated kernel (OREPA)
or a ``1x1 -> BN -> kxk`` chain (DBB) does not. So the term here is the plain squared norm
of the folded kernel for every block type, with its full gradient: it reaches the branch
weights, the BN scales that multiply them (``gamma``; the running statistics are constants)
and OREPA's branch scales, exactly as autograd differentiates ``||K||^2``; and a RepVGG
identity branch, which the official term leaves out, is part of ``K``. For a ``ConvBN``
block, ``weight = weight_decay / 2`` gives the decay ``weight_decay * t^2 * W``: plain weight
decay scaled by the squared BN scale of the channel.

Composition with the optimizer's weight decay: the term replaces the decay of the branch
parameters, so set it to zero there. When every conv of the backbone is a block (as in
``mmreparam.ResNet`` and ``mmreparam.RepVGG``), ``paramwise_cfg=dict(custom_keys={'backbone':
dict(decay_mult=0.)})`` does it (that key also stops the decay of the backbone's BN
parameters; and every longer key, such as ``'backbone.stem'``, needs its own
``decay_mult=0.``, because mmengine applies only the longest matching key).

Cost: every block's folded kernel is computed once more per training step, forward and
backward (for OREPA a second run of every kernel generator, whose kernels the forward pass
does not keep). The work is parameter-sized, independent of the batch: with real batch
sizes the conv work grows and the term does not (measured costs: docs/en/user_guides/int8.md).
"""
import logging
import math
from typing import List, Optional, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ..registry import MODELS
from ..utils import ConfigType, autocast_off
from .layers import ReparamBlock

__all__ = ['equivalent_kernel_blocks', 'equivalent_kernel_l2', 'EquivalentKernelL2Loss',
           'with_equivalent_kernel_l2']


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def equivalent_kernel_blocks(model: nn.Module) -> List[ReparamBlock]:
    """The blocks whose folded kernels :func:`equivalent_kernel_l2` penalises.

    These are the :class:`~mmreparam.models.layers.ReparamBlock` of ``model`` (``model``
    itself included) that are not inside another one (the OREPA branch of an
    ``OREPAVGGBlock`` is part of its parent's kernel), are not folded, and have at least one
    parameter with ``requires_grad`` (a frozen stage's kernels cannot change).

    Args:
        model (nn.Module): Any model: a block, a backbone, a detector, ...

    Returns:
        list[ReparamBlock]: The blocks, in ``model.modules()`` order.
    """
    blocks: List[ReparamBlock] = []

    def visit(module: nn.Module) -> None:
        if isinstance(module, ReparamBlock):
            if not module.folded and _trainable(module):
                blocks.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return blocks


def equivalent_kernel_l2(model: nn.Module) -> Tensor:
    """The sum of the squared norms of the folded kernels of ``model``'s blocks.

    ``sum ||K||^2`` over :func:`equivalent_kernel_blocks`, with ``K`` from
    ``get_equivalent_kernel_bias()`` (differentiable; the BN running statistics enter as
    constants). Computed without autocast, as the fold computes ``K``, and summed in the
    parameters' dtype (at least float32).

    Args:
        model (nn.Module): Any model.

    Returns:
        Tensor: A scalar; a zero without gradient when there is no such block.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    total = None
    with autocast_off(device.type):
        for block in equivalent_kernel_blocks(model):
            kernel, _ = block.get_equivalent_kernel_bias()
            term = kernel.to(torch.promote_types(kernel.dtype, torch.float32)).square().sum()
            total = term if total is None else total + term
    return torch.zeros((), device=device) if total is None else total


class EquivalentKernelL2Loss(nn.Module):
    """``weight * equivalent_kernel_l2(model)``, added to a model's losses by :meth:`attach`.

    Once attached, every ``model(..., mode='loss')`` call (what mmengine's ``train_step``
    makes) returns its losses dict with one more entry, ``loss_name``; mmengine's
    ``parse_losses`` adds it to the total loss and logs it. The module has no parameters or
    buffers: the model's ``state_dict`` does not change.

    Args:
        weight (float): Coefficient of the term; 0 turns it off (no key, no cost).
            Defaults to 1e-4.
        loss_name (str): Key of the term in the losses dict; must contain ``'loss'`` so
            that mmengine adds it to the total loss. Defaults to ``'loss_eq_l2'``.
    """

    def __init__(self, weight: float = 1e-4, loss_name: str = 'loss_eq_l2'):
        super().__init__()
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(f'EquivalentKernelL2Loss: weight must be a finite number >= 0, '
                             f'got {weight!r}')
        if not isinstance(loss_name, str) or 'loss' not in loss_name:
            raise ValueError(f"EquivalentKernelL2Loss: loss_name must contain 'loss' (mmengine "
                             f'only sums such keys), got {loss_name!r}')
        self.weight = float(weight)
        self.loss_name = loss_name

    def forward(self, model: nn.Module) -> Tensor:
        """Return ``weight * equivalent_kernel_l2(model)``."""
        return self.weight * equivalent_kernel_l2(model)

    def attach(self, model: nn.Module, name: str = 'equivalent_kernel_l2') -> nn.Module:
        """Make ``model(..., mode='loss')`` return this term in its losses.

        Registers this module as ``model.<name>`` (it shows in ``print(model)`` and goes
        along with ``deepcopy``) and a forward hook on ``model`` that adds the term when the
        call has ``mode='loss'`` as a keyword and returns a dict. Works with anything
        mmengine builds (detectors, segmentors, classifiers) and under its model wrappers.

        Args:
            model (nn.Module): The model trained.
            name (str): The attribute name. Defaults to ``'equivalent_kernel_l2'``.

        Returns:
            nn.Module: ``model``.
        """
        if hasattr(model, name):
            raise ValueError(f'{type(model).__name__} already has an attribute {name!r}: '
                             'attach the equivalent-kernel L2 once')
        model.add_module(name, self)
        model.register_forward_hook(self._add_to_losses, with_kwargs=True)
        blocks = equivalent_kernel_blocks(model)
        if self.weight == 0:
            state = 'off (weight=0)'
        elif blocks:
            state = f'weight={self.weight:g} on {len(blocks)} blocks'
        else:
            state = 'no unfolded re-parameterizable block with trainable parameters yet'
        print_log(f'mmreparam: equivalent-kernel L2 ({self.loss_name}) on '
                  f'{type(model).__name__}: {state}', logger='current')
        return model

    def _add_to_losses(self, model: nn.Module, args, kwargs, output):
        if self.weight == 0 or kwargs.get('mode') != 'loss' or not isinstance(output, dict):
            return None
        if self.loss_name in output:
            raise KeyError(f'{type(model).__name__} already returns a loss named '
                           f'{self.loss_name!r}: give EquivalentKernelL2 another loss_name')
        output[self.loss_name] = self(model)
        return output

    def extra_repr(self) -> str:
        return f'weight={self.weight:g}, loss_name={self.loss_name!r}'


@MODELS.register_module(name='EquivalentKernelL2')
def with_equivalent_kernel_l2(model: Union[ConfigType, nn.Module], weight: float = 1e-4,
                              loss_name: str = 'loss_eq_l2',
                              data_preprocessor: Optional[ConfigType] = None) -> nn.Module:
    """Build ``model`` and add the equivalent-kernel L2 to its losses (registered as
    ``'mmreparam.EquivalentKernelL2'``).

    In a config, wrap the model dict::

        model = dict(type='mmreparam.EquivalentKernelL2', weight=5e-5,
                     model=dict(type='FasterRCNN', backbone=dict(type='mmreparam.ResNet',
                                                                  reparam='OREPA', ...), ...))

    What is built and returned is the inner model itself (a ``FasterRCNN`` here), with an
    :class:`EquivalentKernelL2Loss` attached: its ``state_dict``, attributes and methods are
    unchanged, so checkpoints, ``load_from``, ``FoldHook``'s ``deploy.pth`` and the hooks
    of mmdet / mmseg / mmpretrain work as without it, and its losses gain ``loss_name``. The
    inner config is built in the current default scope (``default_scope`` of the config).

    mmengine's Runner adds the config's top-level ``data_preprocessor`` (which every
    mmseg and mmpretrain config has) to the model dict it builds, here the wrapper's: it is
    passed on to the inner model config as the Runner would have, unless that config has
    its own (``setdefault``).

    Args:
        model (dict | nn.Module): The model, or its config.
        weight (float): Coefficient of the term; 0 turns it off. Defaults to 1e-4.
        loss_name (str): Key of the term in the losses. Defaults to ``'loss_eq_l2'``.
        data_preprocessor (dict, optional): The data preprocessor for the inner model
            config (see above). Ignored, with a warning, when ``model`` is already built.
            Defaults to None.

    Returns:
        nn.Module: The model, with the term attached.
    """
    regularizer = EquivalentKernelL2Loss(weight, loss_name)
    if not isinstance(model, nn.Module):
        model = dict(model)
        if data_preprocessor is not None:
            model.setdefault('data_preprocessor', data_preprocessor)
        model = MODELS.build(model)
    elif data_preprocessor is not None:
        print_log(f'mmreparam: EquivalentKernelL2 got a data_preprocessor and a built '
                  f'{type(model).__name__}: the model keeps its own', logger='current',
                  level=logging.WARNING)
    return regularizer.attach(model)
