"""RepOptimizer (Ding et al., ICLR 2023): SGD with per-parameter Grad Mults, for mmengine.

:class:`RepOptSGD` multiplies the gradient of each RepOpt kernel by its Grad Mult and then
runs :class:`torch.optim.SGD` unchanged. With constant multipliers this reproduces SGD on
the CSLA model exactly, momentum, Nesterov, dampening and weight decay included:

- every update of SGD is linear in the gradient and in the parameter, and the CSLA
  model's equivalent kernel ``W = s * W3 + t * W1 + w_id * I`` is linear in its branch
  parameters, so the branches' momentum buffers sum to one buffer of ``W``;
- the branch gradients are ``s * g``, ``t * g[centre]``, ``g[identity taps]`` (``g`` the
  gradient of ``W``), which move ``W`` by ``(s^2 + t^2 [centre] + 1 [identity]) * g``:
  the Grad Mult, applied to the gradient only;
- weight decay ``lambda * W3``, ``lambda * W1``, ``lambda * w_id`` moves ``W`` by
  ``lambda * W``: plain weight decay on ``W``, not multiplied. This needs the same decay on
  the three branches, as in the official code (which decays ``scale_identity.weight`` like
  the kernels).

It is *not* equivalent under gradient clipping (the CSLA model's gradient norm is not the
plain model's), with adaptive optimizers (Adam / AdamW normalize each parameter), or when
the branches would get different learning rates or decays.
"""
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import Tensor
from torch.optim import SGD

from ...registry import OPTIM_WRAPPER_CONSTRUCTORS

GradMults = Sequence[Tuple[Tensor, Tensor]]


class RepOptSGD(SGD):
    """:class:`torch.optim.SGD` whose gradients are first multiplied by fixed Grad Mults.

    ``step()`` multiplies ``p.grad`` in place by the multiplier of each listed parameter
    (so after the step those ``.grad`` hold the multiplied gradient), then runs SGD: weight
    decay, momentum and Nesterov apply to the multiplied gradient, as in the official
    ``RepOptimizerSGD``. Parameters without a multiplier are updated by plain SGD. The
    multipliers are not part of ``state_dict()``: they are rebuilt from the scales, so
    checkpoints are those of SGD.

    Args:
        params (iterable): Parameters or parameter groups, as for SGD.
        grad_mults (Sequence[tuple[Tensor, Tensor]]): ``(parameter, multiplier)`` pairs,
            the multiplier shaped like the parameter. Every parameter must be optimized.
        **kwargs: ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``, ...
            as for :class:`torch.optim.SGD`.
    """

    def __init__(self, params: Iterable, grad_mults: GradMults, **kwargs):
        super().__init__(params, **kwargs)
        optimized = {id(p) for group in self.param_groups for p in group['params']}
        self._grad_mults: List[Tuple[Tensor, Tensor]] = []
        seen = set()
        for param, mult in grad_mults:
            if id(param) not in optimized:
                raise ValueError(f'a Grad Mult is given for a parameter of shape '
                                 f'{tuple(param.shape)} that this optimizer does not update')
            if id(param) in seen:
                raise ValueError(f'two Grad Mults for one parameter of shape '
                                 f'{tuple(param.shape)}')
            if mult.shape != param.shape:
                raise ValueError(f'Grad Mult of shape {tuple(mult.shape)} for a parameter of '
                                 f'shape {tuple(param.shape)}')
            seen.add(id(param))
            self._grad_mults.append((param, mult.detach().to(param.device, param.dtype)))

    @property
    def grad_mults(self) -> List[Tuple[Tensor, Tensor]]:
        """The ``(parameter, multiplier)`` pairs."""
        return list(self._grad_mults)

    @torch.no_grad()
    def apply_grad_mults(self) -> None:
        """Multiply the gradients in place (what :meth:`step` does before updating)."""
        for index, (param, mult) in enumerate(self._grad_mults):
            grad = param.grad
            if grad is None:
                continue
            if mult.device != grad.device or mult.dtype != grad.dtype:
                mult = mult.to(grad.device, grad.dtype)  # the model moved since
                self._grad_mults[index] = (param, mult)
            grad.mul_(mult)

    @torch.no_grad()
    def step(self, closure=None):
        """Multiply the gradients by the Grad Mults, then take an SGD step.

        Args:
            closure (callable, optional): Re-evaluates the model and returns the loss; it
                runs before the gradients are multiplied.

        Returns:
            The loss returned by ``closure``, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.apply_grad_mults()
        super().step()
        return loss


def collect_grad_mults(model: nn.Module, scales=None) -> List[Tuple[Tensor, Tensor]]:
    """The Grad Mults of every module of ``model`` that has ``repopt_grad_mults()``.

    Those modules (:class:`mmreparam.RepOptVGG` with ``mode='target'``) compute them from
    their kernels and scales; the hyper-search and CSLA forms have none (they train with
    plain SGD).

    Args:
        model (nn.Module): The model (a classifier, detector, ... or a backbone).
        scales (str | dict, optional): Scales for the one such module, given to its
            ``use_scales()`` first: taken if it holds none yet, else they must be the same
            (see :meth:`mmreparam.models.backbones.repoptvgg.TargetRepOptVGG.use_scales`).
            Defaults to None.

    Returns:
        list[tuple[Tensor, Tensor]]: ``(parameter, multiplier)`` pairs.

    Raises:
        ValueError: No such module, ``scales`` with more than one of them, or scales that
            differ from the module's.
    """
    owners = [(name, module) for name, module in model.named_modules()
              if callable(getattr(module, 'repopt_grad_mults', None))]
    if not owners:
        raise ValueError(f'{type(model).__name__} has no module with Grad Mults for a '
                         "RepOptimizer (e.g. mmreparam.RepOptVGG with mode='target'; the "
                         "'hs' and 'csla' forms train with a plain optimizer)")
    if scales is not None and len(owners) > 1:
        raise ValueError(f'optim_wrapper scales are ambiguous for {len(owners)} RepOpt '
                         f'modules ({[name for name, _ in owners]}); set scales on each')
    pairs = []
    for _, module in owners:
        if scales is not None:
            module.use_scales(scales)
        pairs.extend(module.repopt_grad_mults())
    return pairs


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class RepOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Build a RepOptimizer (:class:`RepOptSGD`) wrapper for a model with RepOpt modules.

    Use it from any OpenMMLab config (no ``custom_imports``)::

        optim_wrapper = dict(
            constructor='mmreparam.RepOptimizerConstructor',
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9, nesterov=True,
                           weight_decay=4e-5),
            paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))

    The Grad Mults come from the model's RepOpt modules (:class:`mmreparam.RepOptVGG`
    with ``mode='target'``, see :func:`collect_grad_mults`) and their ``scales``.
    ``paramwise_cfg`` works as with the default constructor. The optimizer must be SGD:
    the Grad Mults are derived for SGD's update rule. ``clip_grad`` is accepted but warned
    about: clipping breaks the equivalence with the multi-branch model (the official README
    says so too).

    Args:
        optim_wrapper_cfg (dict): The ``optim_wrapper`` config; may hold ``scales``
            (``'const'``, a scales file or HS checkpoint, or a scales dict) for the model's
            RepOpt module, which takes them if it was built with ``scales=None`` (before
            ``init_weights()``, so that its kernels start from the same scales) and
            otherwise must hold the same.
        paramwise_cfg (dict, optional): As for :class:`DefaultOptimWrapperConstructor`.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.scales = optim_wrapper_cfg.pop('scales', None)
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.optim_wrapper_cfg.get('clip_grad'):
            warnings.warn(
                'RepOptimizerConstructor: clip_grad is set; gradient clipping breaks the '
                'equivalence of the RepOptimizer with the multi-branch (CSLA) model. The '
                'official RepOptimizers README: do not clip gradients when training with a '
                'RepOptimizer.', UserWarning, stacklevel=2)

    def _optimizer_class(self):
        optimizer_type = self.optimizer_cfg.get('type')
        optimizer_cls = optimizer_type
        if isinstance(optimizer_type, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_type)
        if optimizer_cls is SGD:
            return RepOptSGD
        if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, RepOptSGD):
            return optimizer_cls
        raise ValueError(f'RepOptimizerConstructor needs optimizer type SGD (its Grad Mults '
                         f'are derived for SGD), got {optimizer_type!r}')

    def __call__(self, model: nn.Module) -> OptimWrapper:
        """Build the optimizer wrapper: a :class:`RepOptSGD` with the model's Grad Mults."""
        if hasattr(model, 'module'):
            model = model.module
        optimizer_cls = self._optimizer_class()
        grad_mults = collect_grad_mults(model, self.scales)
        if self.paramwise_cfg:
            params: list = []
            self.add_params(params, model)
        else:
            params = list(model.parameters())
        kwargs = {key: value for key, value in self.optimizer_cfg.items() if key != 'type'}
        optimizer = optimizer_cls(params, grad_mults=grad_mults, **kwargs)
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        wrapper_cfg.setdefault('type', 'OptimWrapper')
        print_log(f'RepOptimizerConstructor: {type(optimizer).__name__} with Grad Mults on '
                  f'{len(grad_mults)} kernels', logger='current')
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


__all__ = ['RepOptSGD', 'RepOptimizerConstructor', 'collect_grad_mults']
