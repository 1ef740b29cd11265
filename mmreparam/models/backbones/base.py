"""What mmreparam's backbones share: stage freezing, norm_eval, pretrained init, deploy."""
import contextlib
from typing import List, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...errors import CheckpointError
from ...utils import pretrained_init, without_pretrained
from ..layers.base import Foldable
from ..layers.foreign import fold_children
from ..layers.orepa import batched_kernel_generation

#: The activation inside the units of the ResNet-style backbones (as mmdet's ResNet).
RELU = dict(type='ReLU', inplace=True)


def check_out_indices(out_indices: Union[int, Sequence[int]],
                      num_stages: int) -> Tuple[int, ...]:
    """Check ``out_indices`` against ``num_stages`` and return them as non-negative stages.

    Args:
        out_indices (int | Sequence[int]): Stages whose outputs a backbone returns; negative
            ones count from the last (as in mmpretrain).
        num_stages (int): Number of stages.

    Returns:
        tuple[int]: The stages, each in ``[0, num_stages)``.

    Raises:
        ValueError: None given, or one that is not a stage.
    """
    indices = (out_indices, ) if isinstance(out_indices, int) else tuple(out_indices)
    if not indices or any(not isinstance(i, int) or not -num_stages <= i < num_stages
                          for i in indices):
        raise ValueError(f'out_indices {indices} must be stages in [{-num_stages}, '
                         f'{num_stages}) (negative: from the last)')
    return tuple(i % num_stages for i in indices)


def check_per_stage(num_stages: int, **values: Sequence) -> None:
    """Raise a ValueError unless each of ``values`` (``strides=...``, ``dilations=...``)
    has one entry per stage; the message names them all."""
    if any(len(value) != num_stages for value in values.values()):
        names = ' and '.join(f'{name} {tuple(value)}' for name, value in values.items())
        verb = 'needs' if len(values) == 1 else 'need'
        raise ValueError(f'{names} {verb} one value per stage ({num_stages})')


class ReparamBackbone(BaseModule):
    """Base of :class:`ResNet` and :class:`RepVGG`.

    Subclasses set ``self.stem``, ``self.out_indices``, ``self.frozen_stages``,
    ``self.norm_eval`` and ``self._built_deploy`` (the constructor's ``deploy``), list
    their stages (after the stem) in :meth:`stage_modules`, and override
    :meth:`forward_stem` when more than the stem runs before the first stage.

    Attributes:
        batched_generation (str | bool): How the OREPA generators of the backbone make
            their kernels: ``'auto'`` (the default) in batches of one shape on every device
            but the CPU (see :func:`~mmreparam.models.layers.batched_kernel_generation`),
            ``True`` in batches everywhere, ``False`` per layer. Not a constructor argument
            and not state: set it on a built model to compare the two.
    """
    batched_generation = 'auto'
    _built_deploy = False

    @property
    def deploy(self) -> bool:
        """Whether the backbone is in its deploy form: all its re-parameterizable modules
        are folded (built with ``deploy=True``, or folded by :func:`mmreparam.fold` or
        :meth:`switch_to_deploy`). Derived from the blocks; the constructor's ``deploy``
        when the backbone holds none."""
        foldables = [m for m in self.modules()
                     if m is not self and isinstance(m, Foldable)]
        if not foldables:
            return self._built_deploy
        return all(m.folded for m in foldables)

    def stage_modules(self) -> List[nn.Module]:
        """The stages after the stem, in order."""
        raise NotImplementedError

    def forward_stem(self, x: Tensor) -> Tensor:
        """The part before the first stage (the stem, and its pooling if any)."""
        return self.stem(x)

    def _generation(self):
        if self.batched_generation not in ('auto', True, False):
            raise ValueError(f"{type(self).__name__}.batched_generation must be 'auto', True "
                             f'or False, got {self.batched_generation!r}')
        if self.batched_generation is False:
            return contextlib.nullcontext(False)
        constants = self.__dict__.setdefault('_generation_constants', {})  # not state
        return batched_kernel_generation(self, constants, cpu=self.batched_generation is True)

    def forward(self, x: Tensor) -> tuple:
        """Return the features of the stages in ``out_indices``.

        The kernels of the OREPA generators are generated in batches of one shape
        (:func:`~mmreparam.models.layers.batched_kernel_generation`) where that applies.
        """
        with self._generation():
            x = self.forward_stem(x)
            outs = []
            for i, stage in enumerate(self.stage_modules()):
                x = stage(x)
                if i in self.out_indices:
                    outs.append(x)
        return tuple(outs)

    def _freeze_stages(self):
        """Freeze the stem (``frozen_stages >= 0``) and the first ``frozen_stages`` stages."""
        if self.frozen_stages < 0:
            return
        for module in [self.stem, *self.stage_modules()[:self.frozen_stages]]:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        """Set the mode, keeping frozen stages and (with ``norm_eval``) BNs in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        """Initialize as mmengine does, but load a ``Pretrained`` init (alone or in a list
        of inits, after the others) through mmreparam's converter (any supported layout)."""
        pretrained = pretrained_init(self.init_cfg)
        if pretrained is None:
            super().init_weights()
            return
        others, full = without_pretrained(self.init_cfg), self.init_cfg
        if others is not None:
            self.init_cfg = others
            try:
                super().init_weights()
            finally:
                self.init_cfg = full
        from ...checkpoint import load_pretrained  # the checkpoint layer builds on models
        load_pretrained(self, pretrained['checkpoint'], prefix=pretrained.get('prefix'),
                        allow_nonfinite=pretrained.get('allow_nonfinite', False))
        self._is_init = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse a checkpoint of the other form (train-time vs folded) with a clear error.

        Loaded non-strictly (as mmengine's ``load_checkpoint`` and ``tools/test.py`` do), a
        train-time checkpoint in a ``deploy=True`` model, or a folded one in a train-time
        model, would leave every block at its initialization with only a warning.
        """
        own = self.state_dict(keep_vars=True)
        roots = {k.split('.', 1)[0] for k in own}  # only keys of this backbone's modules
        incoming = [k for k in state_dict
                    if k.startswith(prefix) and k[len(prefix):].split('.', 1)[0] in roots]
        own_folded = any('.reparam_conv.' in k for k in own)
        in_folded = any('.reparam_conv.' in k for k in incoming)
        foreign = [k for k in incoming if k[len(prefix):] not in own]
        if incoming and foreign and own_folded != in_folded:
            if own_folded:
                raise CheckpointError(
                    f'{type(self).__name__} (prefix {prefix!r}) is folded (deploy=True) but '
                    f'the checkpoint holds train-time weights (e.g. {foreign[0]!r}): load it '
                    'into the train-time config, or fold it first with tools/fold.py')
            raise CheckpointError(
                f'{type(self).__name__} (prefix {prefix!r}) is a train-time model but the '
                f'checkpoint holds folded weights (e.g. {foreign[0]!r}): use the deploy '
                'config (deploy=True), or init_cfg=dict(type="Pretrained", ...), which converts')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def switch_to_deploy(self):
        """Fold every block in place (the mmpretrain-style name of :func:`mmreparam.fold`)."""
        fold_children(self)
