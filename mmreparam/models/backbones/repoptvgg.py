"""``mmreparam.RepOptVGG``: RepOpt-VGG, a plain VGG trained with a RepOptimizer.

"Re-parameterizing Your Optimizers rather than Architectures" (Ding et al., ICLR 2023,
arXiv 2205.15242) moves RepVGG's structural prior from the model into the optimizer: the
plain target model trained with Grad Mults (:mod:`~mmreparam.models.layers.csla`, the two
rules) computes what the multi-branch CSLA model trained with SGD computes. The constants
of those rules, the *scales*, come from a hyper-search (HS) model (:mod:`.repopt_scales`).

``RepOptVGG(mode=...)`` builds one of three forms, each its own class:

- :class:`TargetRepOptVGG` (``'target'``): the plain model, trained with
  :class:`mmreparam.engine.RepOptimizerConstructor`;
- :class:`HSRepOptVGG` (``'hs'``): the hyper-search model, CSLA blocks with trainable scales;
- :class:`CSLARepOptVGG` (``'csla'``): CSLA blocks with constant scales, the multi-branch
  model the target stands for.
"""
import os
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ...registry import MODELS
from ...utils import ConfigType, OptConfigType, pretrained_init
from ..layers import ReparamBlock
from ..layers.csla import CSLABlock, init_plain_kernel, repopt_grad_mult
from .repopt_blocks import plain_block
from .repopt_scales import (
    Scales,
    ScalesSource,
    check_scales,
    constant_scales,
    copy_scales,
    describe_source,
    resolve_scales,
    same_scales,
)
from .repvgg import RepVGG


@MODELS.register_module()
class RepOptVGG(RepVGG):
    """RepOpt-VGG (Ding et al., ICLR 2023): a plain VGG trained with a RepOptimizer.

    RepVGG's layout (``stem``, ``stage_1`` ... ``stage_4``, the same arch table) in one of
    three forms, chosen by ``mode``; ``RepOptVGG(...)`` returns an instance of that form's
    class (all are ``RepOptVGG``):

    - ``'target'`` (:class:`TargetRepOptVGG`): the plain model, ``3x3 conv -> BN -> ReLU``,
      trained with :class:`mmreparam.engine.RepOptimizerConstructor`. Trained from scratch,
      its kernels start from ``scales`` (the official re-initialization); a ``Pretrained``
      init (mmreparam's or the official RepOpt-VGG checkpoints) is loaded as it is.
    - ``'hs'`` (:class:`HSRepOptVGG`): the hyper-search model, :class:`CSLABlock` with
      trainable scales initialized from ``scales`` (by default the paper's ``sqrt(2 / l)``).
      Train it with a plain optimizer (the paper: CIFAR-100, 240 epochs; the official code
      uses no weight decay on ``scale_conv`` / ``scale_1x1``), then save its
      ``get_scales()`` (``tools/repopt_scales.py extract``).
    - ``'csla'`` (:class:`CSLARepOptVGG`): :class:`CSLABlock` with constant ``scales``;
      with SGD it is what the target model with a RepOptimizer computes (its
      ``target_state_dict()`` maps it onto the target).

    The target model is already plain: :func:`mmreparam.fold` (and ``deploy=True``) only
    fuse each BN into its convolution, which is also what ``deploy_config`` builds. Every
    form folds into that same deploy structure.

    Args:
        arch (str | dict): A name of :attr:`arch_settings` (RepVGG's table without SE, plus
            the paper's L1 / L2) or a dict as in :class:`RepVGG`. Defaults to 'B1'.
        mode (str, optional): 'target', 'hs' or 'csla'; None for the class's own form
            ('target' for ``RepOptVGG``). Defaults to None.
        scales (str | dict, optional): ``'const'`` (the HS initial values, the paper's
            "same as HS initialization"), a scales file or HS checkpoint, or a scales dict.
            Read lazily, like a ``Pretrained`` init: by :meth:`init_weights` or the first
            ``get_scales()`` / ``repopt_grad_mults()``. None: ``'const'``, unless the
            RepOptimizerConstructor brings scales before the weights are initialized.
            Defaults to None.
        in_channels (int): Input channels. Defaults to 3.
        base_channels (int): Width before the width factors. Defaults to 64.
        out_indices (Sequence[int]): Stages whose outputs are returned. Defaults to (3, ).
        strides (Sequence[int]): Stride of each stage. Defaults to (2, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Defaults to (1, 1, 1, 1).
        frozen_stages (int): Stages to freeze (-1: none, 0: the stem). Defaults to -1.
        norm_cfg (dict): Any BatchNorm. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation of every block. Defaults to ``dict(type='ReLU')``.
        with_cp (bool): Gradient checkpointing of each block. Defaults to False.
        norm_eval (bool): Keep BNs in eval mode while training. Defaults to False.
        deploy (bool): Build the folded structure (one conv with bias per block, for any
            mode). Defaults to False.
        init_cfg (dict | list[dict], optional): Initialization; None keeps PyTorch's
            default init, as the official RepOpt-VGG. ``Pretrained`` only with 'target'.
    """
    arch_settings = {
        **{name: arch for name, arch in RepVGG.arch_settings.items() if arch['se_cfg'] is None},
        'L1': dict(RepVGG.arch_settings['B1'], num_blocks=[8, 14, 24, 1]),
        'L2': dict(RepVGG.arch_settings['B2'], num_blocks=[8, 14, 24, 1]),
    }
    #: The form's ``mode``; its block form is ``reparam`` (RepVGG's block table key).
    mode = 'target'

    def __new__(cls, arch: Union[str, dict] = 'B1', mode: Optional[str] = None, *args,
                **kwargs):
        if cls is RepOptVGG:
            mode = cls.mode if mode is None else mode
            if mode not in _FORMS:
                raise ValueError(f'unknown RepOptVGG mode {mode!r}; choose one of '
                                 f'{list(_FORMS)}')
            cls = _FORMS[mode]
        return super().__new__(cls)

    def __init__(self,
                 arch: Union[str, dict] = 'B1',
                 mode: Optional[str] = None,
                 scales: Optional[ScalesSource] = None,
                 in_channels: int = 3,
                 base_channels: int = 64,
                 out_indices: Sequence[int] = (3, ),
                 strides: Sequence[int] = (2, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 frozen_stages: int = -1,
                 norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: ConfigType = dict(type='ReLU'),
                 with_cp: bool = False,
                 norm_eval: bool = False,
                 deploy: bool = False,
                 init_cfg: OptConfigType = None):
        if mode is not None and mode != self.mode:
            raise ValueError(f'{type(self).__name__} is the {self.mode!r} form of RepOptVGG, '
                             f'not {mode!r}; build RepOptVGG(mode={mode!r})')
        if scales is not None and not isinstance(scales, (str, os.PathLike, Mapping)):
            raise TypeError(f"scales must be 'const', a file or a dict, got "
                            f'{type(scales).__name__}')
        super().__init__(arch, self.reparam, in_channels, base_channels, out_indices, strides,
                         dilations, frozen_stages, norm_cfg=norm_cfg, act_cfg=act_cfg,
                         with_cp=with_cp, norm_eval=norm_eval, deploy=deploy,
                         init_cfg=init_cfg)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.scales = scales

    def _check_arch(self, arch) -> dict:
        if isinstance(arch, str) and arch not in self.arch_settings:
            raise ValueError(f'unknown RepOptVGG arch {arch!r}; choose one of '
                             f'{list(self.arch_settings)}')
        if isinstance(arch, dict) and (arch.get('use_se') or arch.get('se_cfg') is not None):
            raise ValueError('RepOpt-VGG has no SE variant (arch use_se=True / se_cfg)')
        return super()._check_arch(arch)

    def repopt_blocks(self) -> Dict[str, ReparamBlock]:
        """The blocks in order, by name: ``'stem'``, ``'stage_1.0'``, ``'stage_1.1'``, ..."""
        blocks = {'stem': self.stem}
        for name in self.stages:
            for index, block in enumerate(getattr(self, name)):
                blocks[f'{name}.{index}'] = block
        return blocks

    def check_scales(self, scales: Scales, source: str = 'scales') -> None:
        """Raise :class:`ScalesError` naming every block the scales do not fit."""
        check_scales(scales, self, source)

    def init_weights(self):
        """Initialize as configured; a model trained from scratch then takes its scales
        (a target model: kernels built from them, the Rule of Initialization; an HS / CSLA
        model: its scale layers set to them). Only the first call does."""
        first = not self._is_init
        super().init_weights()
        if first and not self.deploy and pretrained_init(self.init_cfg) is None:
            self._apply_scales()

    def _apply_scales(self) -> None:
        """Bring the freshly initialized model to its scales (see :meth:`init_weights`)."""
        raise NotImplementedError


class TargetRepOptVGG(RepOptVGG):
    """RepOpt-VGG's target model, ``RepOptVGG(mode='target')``: plain ``conv -> BN -> ReLU``
    blocks (:class:`ConvBN`, the official ``RealVGGBlock``), trained with the RepOptimizer.

    It stands for one set of scales (``scales``): its kernels start from them
    (:meth:`init_weights`) and :meth:`repopt_grad_mults` gives the optimizer their Grad
    Mults. Arguments as for :class:`RepOptVGG`.
    """
    mode = 'target'
    reparam = 'base'  # ConvBN, as ResNet's reparam='base'
    block_types = {'base': plain_block}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._resolved: Optional[Scales] = None  # ``scales`` read, checked
        self._init_scales: Optional[Scales] = None  # what the kernels were built from

    def _own_scales(self) -> Scales:
        if self._resolved is None:
            self._resolved = resolve_scales(self.scales, self)
        return self._resolved

    def get_scales(self) -> Scales:
        """The scales the model stands for (copies), read from ``scales`` on the first call.

        Raises:
            ScalesError: ``scales`` is unreadable or does not fit the model.
        """
        return copy_scales(self._own_scales())

    def use_scales(self, source: ScalesSource) -> None:
        """Train with the scales of ``source`` (the RepOptimizerConstructor's ``scales``).

        A model built with ``scales=None`` whose kernels have not been initialized from
        scales yet takes them (mmengine builds the optimizer before ``init_weights()``, so
        the kernels then start from the same scales); a model holding other scales is an
        error, so that the scales are given in one place.

        Args:
            source (str | PathLike | Mapping): A scales source (see :class:`RepOptVGG`).

        Raises:
            ValueError: The model holds (or its kernels were built from) other scales.
            ScalesError: The scales are unreadable or do not fit.
        """
        scales = resolve_scales(source, self)
        current = self._init_scales if self.scales is None else self._own_scales()
        if current is None:
            self.scales, self._resolved = source, scales
            return
        if not same_scales(current, scales):
            held = 'was initialized from' if self.scales is None else 'holds'
            raise ValueError(
                f'the optimizer brings {describe_source(source)}, but the RepOptVGG '
                f'backbone {held} other scales ({describe_source(self.scales or "const")}); '
                'give the scales in one place (model.backbone.scales or optim_wrapper.scales)')

    def _apply_scales(self) -> None:
        """``W <- s * W + t * W1 + w_id * I`` with fresh ``W1`` (the official re-init)."""
        scales = self._own_scales()
        for name, block in self.repopt_blocks().items():
            init_plain_kernel(block.conv.weight, scales[name], block.groups)
        self._init_scales = scales
        print_log(f'RepOptVGG: kernels of {len(scales)} blocks initialized from '
                  f'{describe_source(self.scales or "const")}', logger='current')

    def repopt_grad_mults(self) -> List[Tuple[nn.Parameter, Tensor]]:
        """The Grad Mult of every kernel: ``(conv weight, multiplier)`` pairs.

        What :class:`mmreparam.engine.RepOptimizerConstructor` reads.

        Returns:
            list[tuple[nn.Parameter, Tensor]]: One pair per block, the multiplier in the
            weight's dtype and on its device.

        Raises:
            ValueError: The model is folded.
            ScalesError: The scales are unreadable or do not fit.
        """
        blocks = self.repopt_blocks()
        if self.deploy or any(block.reparam_conv is not None for block in blocks.values()):
            raise ValueError('RepOptVGG is folded (deploy): there is no BN-preceded kernel to '
                             'train with a RepOptimizer')
        scales = self._own_scales()
        return [(block.conv.weight,
                 repopt_grad_mult(scales[name], block.conv.weight.shape, block.groups,
                                  block.conv.weight.dtype, block.conv.weight.device))
                for name, block in blocks.items()]


class CSLARepOptVGG(RepOptVGG):
    """RepOpt-VGG's CSLA model, ``RepOptVGG(mode='csla')``: :class:`CSLABlock` with
    constant scales ``s``, ``t`` (trainable identity factors).

    Trained with SGD it computes what the target model with the RepOptimizer computes;
    :meth:`target_state_dict` maps it onto the target. Arguments as for
    :class:`RepOptVGG`; ``scales`` are the constants, read by :meth:`init_weights`.
    """
    mode = 'csla'
    reparam = 'CSLA'
    block_types = {'CSLA': partial(CSLABlock, trainable_scales=False)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if pretrained_init(self.init_cfg) is not None:
            raise ValueError(f"a Pretrained init is supported with mode='target' only (got "
                             f"mode={self.mode!r}); an HS model trains from scratch")
        if not self.deploy:
            self._set_block_scales(constant_scales(self))

    def get_scales(self) -> Scales:
        """The current scales of the blocks (for 'hs': the searched scales; save them with
        :func:`mmreparam.engine.optimizers.save_scales`).

        Raises:
            ValueError: The model is folded (no scales left).
        """
        return {name: block.get_scales() for name, block in self.repopt_blocks().items()}

    def _set_block_scales(self, scales: Scales) -> None:
        for name, block in self.repopt_blocks().items():
            block.set_scales(scales[name])

    def _apply_scales(self) -> None:
        self._set_block_scales(resolve_scales(self.scales, self))

    def target_state_dict(self) -> Dict[str, Tensor]:
        """The state_dict of the equivalent ``mode='target'`` model.

        Every CSLA block becomes ``conv.weight`` (its merged kernel) and its BN.
        """
        state = {}
        for name, block in self.repopt_blocks().items():
            state.update({f'{name}.{key}': value
                          for key, value in block.target_state_dict().items()})
        return state


class HSRepOptVGG(CSLARepOptVGG):
    """RepOpt-VGG's hyper-search model, ``RepOptVGG(mode='hs')``: the CSLA model with
    trainable scales, initialized from ``scales``. Arguments as for :class:`RepOptVGG`."""
    mode = 'hs'
    block_types = {'CSLA': partial(CSLABlock, trainable_scales=True)}


_FORMS = {form.mode: form for form in (TargetRepOptVGG, HSRepOptVGG, CSLARepOptVGG)}

__all__ = ['RepOptVGG', 'TargetRepOptVGG', 'HSRepOptVGG', 'CSLARepOptVGG']
