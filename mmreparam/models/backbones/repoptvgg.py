"""``mmreparam.RepOptVGG``: RepOpt-VGG, a plain VGG trained with a RepOptimizer.

"Re-parameterizing Your Optimizers rather than Architectures" (Ding et al., ICLR 2023,
arXiv 2205.15242) moves RepVGG's structural prior from the model into the optimizer. A
*CSLA* block (constant-scale linear addition; the official ``LinearAddBlock``)

    ``y = BN(s * conv3x3(x, W3) + t * conv1x1(x, W1) + w_id * x)``

with per-channel constants ``s``, ``t`` and a trainable per-channel ``w_id``, trained with
SGD, computes at every step exactly what the plain ``y = BN(conv3x3(x, W))`` computes when
``W`` starts at ``s * W3 + t * W1 + w_id * I`` (:func:`repopt_kernel`, the *Rule of
Initialization*) and its gradient is multiplied element-wise by the fixed *Grad Mult*
``s^2 + t^2 [centre] + 1 [identity taps]`` (:func:`repopt_grad_mult`, the *Rule of
Iteration*). The constants (*scales*) come from a hyper-search (HS) model, the CSLA network
with trainable scales trained on a small data set, or are the HS model's initial values
(``'const'``). :class:`mmreparam.engine.RepOptimizerConstructor` applies the Grad Mults.

Scales are a dict ``{block name: {'conv': s, 'conv_1x1': t[, 'identity': w_id]}}`` of
``(C_out, )`` tensors, block names as in the backbone (``'stem'``, ``'stage_1.0'``, ...).
A scales file is ``{'scales': <that dict>, 'meta': {...}}`` (:func:`save_scales`);
:func:`load_scales` also reads HS checkpoints, mmreparam's or the official ones
(``stage0.scale_conv.weight`` ...), e.g. the released ``RepOpt-VGG-B1-scales.pth``.
"""
import math
import os
import re
from functools import partial
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ...errors import CheckpointError
from ...fileio import save_checkpoint_atomic
from ...registry import MODELS
from ...utils import ConfigType, OptConfigType, pretrained_init
from ..layers import ConvBN, ReparamBlock, build_bn
from ..layers.fuse import fuse_bn, identity_kernel, pad_kernel
from .repvgg import RepVGG

Scales = Dict[str, Dict[str, Tensor]]
ScalesSource = Union[str, os.PathLike, Mapping]

#: The branches of a CSLA block that carry a scale; 'identity' only where the block has one.
SCALE_KEYS = ('conv', 'conv_1x1', 'identity')
#: ``meta['format']`` of the files written by :func:`save_scales`.
SCALES_FORMAT = 'mmreparam.repopt_scales'
_HS_KEY = re.compile(r'^(.+)\.scale_(conv|1x1|identity)\.weight$')
_OFFICIAL_STAGE = re.compile(r'^stage([1-9]\d*)\.(\d+)$')
_HS_NAMES = {'conv': 'conv', '1x1': 'conv_1x1', 'identity': 'identity'}


class ScalesError(ValueError):
    """RepOpt scales are unreadable, malformed, or do not fit the model."""


# --------------------------------------------------------------------------------------
# The two rules (pure tensor functions)


def repopt_kernel(kernel: Tensor, kernel_1x1: Tensor, scale: Tensor, scale_1x1: Tensor,
                  scale_identity: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """The one ``kxk`` kernel a CSLA block computes: ``s * W3 + t * W1 + w_id * I``.

    This is the *Rule of Initialization* of RepOpt-VGG (the plain kernel starts as the
    kernel of a freshly initialized CSLA block) and the map from a CSLA block to the plain
    one. Differentiable; follows the dtype and device of ``kernel``.

    Args:
        kernel (Tensor): ``(C_out, C_in / g, k, k)`` kernel ``W3``.
        kernel_1x1 (Tensor): ``(C_out, C_in / g, 1, 1)`` kernel ``W1`` (centred in ``kxk``).
        scale (Tensor): ``(C_out, )`` scale ``s`` of ``W3``.
        scale_1x1 (Tensor): ``(C_out, )`` scale ``t`` of ``W1``.
        scale_identity (Tensor, optional): ``(C_out, )`` factor ``w_id`` of the identity
            branch (needs ``C_in == C_out``); None for a block without identity.
        groups (int): Groups of the convolution. Defaults to 1.

    Returns:
        Tensor: The ``(C_out, C_in / g, k, k)`` kernel.
    """
    def per_out(vector: Tensor) -> Tensor:
        return vector.to(kernel).reshape(-1, 1, 1, 1)

    size = kernel.shape[-1]
    out = kernel * per_out(scale) + pad_kernel(kernel_1x1.to(kernel), size) * per_out(scale_1x1)
    if scale_identity is not None:
        ident = identity_kernel(kernel.shape[0], size, groups, dtype=kernel.dtype,
                                device=kernel.device)
        out = out + ident * per_out(scale_identity)
    return out


def repopt_grad_mult(scales: Mapping[str, Tensor], kernel_shape: Sequence[int],
                     groups: int = 1, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> Tensor:
    """The Grad Mult of a plain ``kxk`` kernel standing for a CSLA block (Rule of Iteration).

    A branch whose trainable kernel is scaled by a constant ``c`` moves the equivalent
    kernel by ``c * (-lr * c * grad)``, so the multiplier is the CSLA kernel of unit kernels
    with squared scales: ``s^2`` on every tap, ``+ t^2`` on the centre tap, ``+ 1`` on the
    identity taps (the identity's trainable factor is scaled by the constant 1). This is
    the paper's ``M`` (its Eq. 3) and the official ``RepOptVGGHandler`` with SGD.

    Args:
        scales (Mapping[str, Tensor]): ``'conv'``, ``'conv_1x1'`` and, for a block with an
            identity branch, ``'identity'`` (only its presence matters here).
        kernel_shape (Sequence[int]): ``(C_out, C_in / g, k, k)``.
        groups (int): Groups of the convolution. Defaults to 1.
        dtype (torch.dtype, optional): Result dtype; None for the default dtype.
        device (torch.device, optional): Result device.

    Returns:
        Tensor: The multiplier, shaped like the kernel (computed in float64).
    """
    c_out, c_in_g = kernel_shape[:2]
    ones = torch.ones(tuple(kernel_shape), dtype=torch.float64, device=device)
    ones_1x1 = torch.ones(c_out, c_in_g, 1, 1, dtype=torch.float64, device=device)
    has_identity = scales.get('identity') is not None
    mult = repopt_kernel(ones, ones_1x1, scales['conv'].double() ** 2,
                         scales['conv_1x1'].double() ** 2,
                         torch.ones(c_out, dtype=torch.float64) if has_identity else None,
                         groups)
    return mult.to(dtype or torch.get_default_dtype())


# --------------------------------------------------------------------------------------
# Blocks


class ScaleLayer(nn.Module):
    """Per-channel scaling ``x * weight``: a CSLA branch's scale, trainable or constant.

    A constant scale is a buffer (it is in the state_dict, never in an optimizer), a
    trainable one a parameter; both are saved as ``weight`` (the official key).

    Args:
        num_features (int): Channels.
        init (float): Initial value. Defaults to 1.0.
        trainable (bool): Parameter (True) or buffer (False). Defaults to True.
    """

    def __init__(self, num_features: int, init: float = 1.0, trainable: bool = True):
        super().__init__()
        value = torch.full((num_features, ), float(init))
        if trainable:
            self.weight = nn.Parameter(value)
        else:
            self.register_buffer('weight', value)

    def forward(self, x: Tensor) -> Tensor:
        """Scale each channel."""
        return x * self.weight.reshape(1, -1, 1, 1)


@MODELS.register_module()
class CSLABlock(ReparamBlock):
    """RepOpt-VGG's CSLA block (the official ``LinearAddBlock``), the hyper-search block.

    ``BN(s * conv_kxk(x) + t * conv_1x1(x) [+ w_id * x]) -> act``, the identity term when
    ``in_channels == out_channels`` and ``stride == 1``. With ``trainable_scales=True`` this
    is the hyper-search (HS) block: ``s``, ``t`` and ``w_id`` train. With
    ``trainable_scales=False`` it is the CSLA block: ``s`` and ``t`` are constant buffers
    and ``w_id`` trains, as in the official ``is_csla=True``; trained with SGD it is
    equivalent to the plain ``conv -> BN`` with a RepOptimizer. Folds into one conv with
    bias (its BN included), like every block. See :class:`ReparamBlock` for the common
    arguments.

    Args:
        scale_init (float): Initial ``s`` and ``t``. Defaults to 1.0.
        trainable_scales (bool): Train ``s`` and ``t``. Defaults to True.
        use_se (bool): Must be False (RepOpt-VGG has no SE). Defaults to False.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, dilation: int = 1,
                 groups: int = 1, norm_cfg: ConfigType = dict(type='BN'),
                 act_cfg: OptConfigType = None, deploy: bool = False,
                 scale_init: float = 1.0, trainable_scales: bool = True,
                 use_se: bool = False, init_cfg: OptConfigType = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, norm_cfg, act_cfg, deploy, init_cfg)
        if use_se:
            raise ValueError('CSLABlock has no SE variant (RepOpt-VGG has none)')
        if kernel_size < 3:
            raise ValueError(f'CSLABlock needs kernel_size >= 3 (got {kernel_size})')
        self.trainable_scales = trainable_scales
        if deploy:
            return
        common = dict(stride=stride, groups=groups, bias=False)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=self.padding,
                              dilation=dilation, **common)
        self.scale_conv = ScaleLayer(out_channels, scale_init, trainable_scales)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, **common)
        self.scale_1x1 = ScaleLayer(out_channels, scale_init, trainable_scales)
        # The identity factor trains in both forms (the official is_csla freezes only s, t).
        self.scale_identity = ScaleLayer(out_channels) if self.has_identity else None
        self.bn = build_bn(norm_cfg, out_channels)

    @property
    def has_identity(self) -> bool:
        """Whether the block has an identity branch (same channels, stride 1)."""
        return self.in_channels == self.out_channels and self.stride == 1

    def _forward_branches(self, x: Tensor) -> Tensor:
        out = self.scale_conv(self.conv(x)) + self.scale_1x1(self.conv_1x1(x))
        if self.scale_identity is not None:
            out = out + self.scale_identity(x)
        return self.bn(out)

    def merged_kernel(self) -> Tensor:
        """The plain kernel before the BN: :func:`repopt_kernel` of the branches."""
        return repopt_kernel(self.conv.weight, self.conv_1x1.weight, self.scale_conv.weight,
                             self.scale_1x1.weight,
                             None if self.scale_identity is None else
                             self.scale_identity.weight, self.groups)

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The merged kernel with the BN folded in."""
        return fuse_bn(self.merged_kernel(), self.bn)

    def get_scales(self) -> Dict[str, Tensor]:
        """The current scales (detached copies), keyed as in :data:`SCALE_KEYS`."""
        self._check_unfolded()
        scales = dict(conv=self.scale_conv.weight.detach().clone(),
                      conv_1x1=self.scale_1x1.weight.detach().clone())
        if self.scale_identity is not None:
            scales['identity'] = self.scale_identity.weight.detach().clone()
        return scales

    @torch.no_grad()
    def set_scales(self, scales: Mapping[str, Tensor]) -> None:
        """Set ``s``, ``t`` and, where the block has it, ``w_id`` (shapes are checked)."""
        self._check_unfolded()
        for key, layer in (('conv', self.scale_conv), ('conv_1x1', self.scale_1x1),
                           ('identity', self.scale_identity)):
            if layer is not None:
                layer.weight.copy_(scales[key].reshape(layer.weight.shape))

    def target_state_dict(self) -> Dict[str, Tensor]:
        """The state of the equivalent plain block (:class:`ConvBN`: ``conv``, ``bn``)."""
        self._check_unfolded()
        state = {'conv.weight': self.merged_kernel().detach().clone()}
        state.update({f'bn.{key}': value.detach().clone()
                      for key, value in self.bn.state_dict().items()})
        return state

    def _check_unfolded(self):
        if self.reparam_conv is not None:
            raise ValueError('the CSLA block is folded: it has no branches or scales left')


def _plain_block(*args, use_se: bool = False, **kwargs) -> ConvBN:
    """RepOpt-VGG's target block, ``conv -> BN -> act`` (the official ``RealVGGBlock``)."""
    if use_se:
        raise ValueError('RepOpt-VGG has no SE variant')
    return ConvBN(*args, **kwargs)


# --------------------------------------------------------------------------------------
# The backbone


@MODELS.register_module()
class RepOptVGG(RepVGG):
    """RepOpt-VGG (Ding et al., ICLR 2023): a plain VGG trained with a RepOptimizer.

    RepVGG's layout (``stem``, ``stage_1`` ... ``stage_4``, the same arch table) with one of
    three block forms:

    - ``mode='target'``: the plain model, ``3x3 conv -> BN -> ReLU`` (:class:`ConvBN`),
      trained with :class:`mmreparam.engine.RepOptimizerConstructor`. Trained from scratch,
      its kernels start from ``scales`` (:func:`repopt_kernel` on fresh kernels, the
      official re-initialization); a ``Pretrained`` init (mmreparam's or the official
      RepOpt-VGG checkpoints) is loaded as it is.
    - ``mode='hs'``: the hyper-search model, :class:`CSLABlock` with trainable scales
      initialized from ``scales`` (by default the paper's ``sqrt(2 / l)``). Train it with a
      plain optimizer (the paper: CIFAR-100, 240 epochs; the official code uses no weight
      decay on ``scale_conv`` / ``scale_1x1``), then save :meth:`get_scales`.
    - ``mode='csla'``: :class:`CSLABlock` with constant ``scales``; with SGD it is what the
      target model with a RepOptimizer computes (:meth:`target_state_dict` maps it).

    The target model is already plain: :func:`mmreparam.fold` (and ``deploy=True``) only
    fuse each BN into its convolution, which is also what ``deploy_config`` builds.

    Args:
        arch (str | dict): A name of :attr:`arch_settings` (RepVGG's table without SE, plus
            the paper's L1 / L2) or a dict as in :class:`RepVGG`. Defaults to 'B1'.
        mode (str): 'target', 'hs' or 'csla'. Defaults to 'target'.
        scales (str | dict, optional): ``'const'`` (the HS initial values, the paper's
            "same as HS initialization"), a scales file or HS checkpoint, or a scales dict.
            Read lazily, like a ``Pretrained`` init: by :meth:`init_weights` or the first
            :meth:`get_scales` / :meth:`repopt_grad_mults`. None: ``'const'``, unless the
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
        **{name: arch for name, arch in RepVGG.arch_settings.items() if not arch['use_se']},
        'L1': dict(RepVGG.arch_settings['B1'], num_blocks=[8, 14, 24, 1]),
        'L2': dict(RepVGG.arch_settings['B2'], num_blocks=[8, 14, 24, 1]),
    }
    block_types = {
        'target': _plain_block,
        'hs': partial(CSLABlock, trainable_scales=True),
        'csla': partial(CSLABlock, trainable_scales=False),
    }

    def __init__(self,
                 arch: Union[str, dict] = 'B1',
                 mode: str = 'target',
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
        if mode not in self.block_types:
            raise ValueError(f'unknown RepOptVGG mode {mode!r}; choose one of '
                             f'{list(self.block_types)}')
        if isinstance(arch, str) and arch not in self.arch_settings:
            raise ValueError(f'unknown RepOptVGG arch {arch!r}; choose one of '
                             f'{list(self.arch_settings)}')
        if isinstance(arch, dict) and arch.get('use_se'):
            raise ValueError('RepOpt-VGG has no SE variant (arch use_se=True)')
        if scales is not None and not isinstance(scales, (str, os.PathLike, Mapping)):
            raise TypeError(f"scales must be 'const', a file or a dict, got "
                            f'{type(scales).__name__}')
        pretrained = pretrained_init(init_cfg) is not None
        if pretrained and mode != 'target':
            raise ValueError(f"a Pretrained init is supported with mode='target' only (got "
                             f"mode={mode!r}); an HS model trains from scratch")
        super().__init__(arch, mode, in_channels, base_channels, out_indices, strides,
                         dilations, frozen_stages, norm_cfg, act_cfg, with_cp, norm_eval,
                         deploy, init_cfg)
        self.mode = mode
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.scales = scales
        self._resolved: Optional[Scales] = None
        self._init_scales: Optional[Scales] = None  # what the kernels were built from
        if mode != 'target' and not deploy:
            self._set_block_scales(constant_scales(self))

    # ---------------------------------------------------------------- blocks and scales

    def repopt_blocks(self) -> Dict[str, ReparamBlock]:
        """The blocks in order, by name: ``'stem'``, ``'stage_1.0'``, ``'stage_1.1'``, ..."""
        blocks = {'stem': self.stem}
        for name in self.stages:
            for index, block in enumerate(getattr(self, name)):
                blocks[f'{name}.{index}'] = block
        return blocks

    def get_scales(self) -> Scales:
        """The scales: the target's (resolved from ``scales``), or the HS / CSLA blocks'.

        For 'hs' this extracts the searched scales (save them with :func:`save_scales`).
        """
        if self.mode == 'target':
            return _copy_scales(self._resolve())
        return {name: block.get_scales() for name, block in self.repopt_blocks().items()}

    def check_scales(self, scales: Scales, source: str = 'scales') -> None:
        """Raise :class:`ScalesError` naming every block the scales do not fit."""
        expected = {name: (block.out_channels, _has_identity(block))
                    for name, block in self.repopt_blocks().items()}
        problems = [f'no scales for block {name}' for name in expected if name not in scales]
        problems += [f'scales for block {name}, which the model does not have'
                     for name in scales if name not in expected]
        for name, (channels, has_identity) in expected.items():
            entry = scales.get(name)
            if entry is None:
                continue
            for key in SCALE_KEYS:
                value = entry.get(key)
                if value is None:
                    if key != 'identity' or has_identity:
                        problems.append(f'{name}: no {key!r} scale')
                elif key == 'identity' and not has_identity:
                    problems.append(f"{name}: an 'identity' scale, but the block has no "
                                    'identity branch')
                elif value.numel() != channels:
                    problems.append(f'{name}: {key!r} has {value.numel()} channels, the '
                                    f'block has {channels}')
        if problems:
            more = f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''
            raise ScalesError(
                f'{source}: the scales do not fit RepOptVGG arch {self.arch_name!r} '
                f'({len(scales)} blocks given, the model has {len(expected)}): '
                f'{"; ".join(problems[:4])}{more}')

    def _resolve(self, source: Optional[ScalesSource] = None) -> Scales:
        """Load, check and (for the backbone's own ``scales``) cache a scales source."""
        own = source is None
        if own and self._resolved is not None:
            return self._resolved
        spec = self.scales if own else source
        spec = 'const' if spec is None else spec
        if isinstance(spec, str) and spec == 'const':
            scales = constant_scales(self)
        else:
            scales = load_scales(spec)
            self.check_scales(scales, _describe(spec))
        if own:
            self._resolved = scales
        return scales

    def _set_block_scales(self, scales: Scales) -> None:
        for name, block in self.repopt_blocks().items():
            block.set_scales(scales[name])

    # ---------------------------------------------------------------- the two rules

    def init_weights(self):
        """Initialize as configured; a 'target' model from scratch then gets its kernels
        from the scales (Rule of Initialization), an HS / CSLA model its scales."""
        first = not self._is_init
        super().init_weights()
        pretrained = pretrained_init(self.init_cfg) is not None
        if not first or pretrained or self.deploy:
            return
        scales = self._resolve()
        if self.mode == 'target':
            self._init_kernels(scales)
        else:
            self._set_block_scales(scales)

    @torch.no_grad()
    def _init_kernels(self, scales: Scales) -> None:
        """``W <- s * W + t * W1 + w_id * I`` with fresh ``W1`` (the official re-init)."""
        for name, block in self.repopt_blocks().items():
            weight = block.conv.weight
            fresh_1x1 = torch.empty(weight.shape[:2] + (1, 1), dtype=weight.dtype,
                                    device=weight.device)
            nn.init.kaiming_uniform_(fresh_1x1, a=math.sqrt(5))  # nn.Conv2d's default
            entry = scales[name]
            weight.copy_(repopt_kernel(weight, fresh_1x1, entry['conv'], entry['conv_1x1'],
                                       entry.get('identity'), block.groups))
        self._init_scales = scales
        print_log(f'RepOptVGG: kernels of {len(scales)} blocks initialized from '
                  f'{_describe(self.scales or "const")}', logger='current')

    def repopt_grad_mults(self, scales: Optional[ScalesSource] = None
                          ) -> List[Tuple[nn.Parameter, Tensor]]:
        """The Grad Mult of every kernel: ``(conv weight, multiplier)`` pairs.

        The hook of :class:`mmreparam.engine.RepOptimizerConstructor`. Only for
        ``mode='target'`` and before folding.

        Args:
            scales (str | dict, optional): Scales brought by the optimizer config. A
                backbone built with ``scales=None`` whose kernels have not been initialized
                from scales yet adopts them (mmengine builds the optimizer before
                ``init_weights()``, so the kernels then start from the same scales); a
                backbone holding other scales is an error. None: the backbone's own.

        Returns:
            list[tuple[nn.Parameter, Tensor]]: One pair per block, the multiplier in the
            weight's dtype and on its device.

        Raises:
            ValueError: Not a target model, folded, or conflicting scales.
            ScalesError: The scales are unreadable or do not fit.
        """
        if self.mode != 'target':
            raise ValueError(f"RepOptVGG(mode={self.mode!r}) trains with a plain optimizer; "
                             "the RepOptimizer is for mode='target'")
        if self.deploy or any(b.reparam_conv is not None for b in self.repopt_blocks().values()):
            raise ValueError('RepOptVGG is folded (deploy): there is no BN-preceded kernel to '
                             'train with a RepOptimizer')
        if scales is not None:
            self._adopt(scales)
        resolved = self._resolve()
        pairs = []
        for name, block in self.repopt_blocks().items():
            weight = block.conv.weight
            pairs.append((weight, repopt_grad_mult(resolved[name], weight.shape, block.groups,
                                                   weight.dtype, weight.device)))
        return pairs

    def _adopt(self, source: ScalesSource) -> None:
        """Take the optimizer's scales, or check that they equal the backbone's."""
        scales = self._resolve(source)
        current = self._init_scales if self.scales is None else self._resolve()
        if current is None:  # scales=None and no kernel built from scales yet
            self.scales, self._resolved = source, scales
            return
        if not _same_scales(current, scales):
            held = 'was initialized from' if self.scales is None else 'holds'
            raise ValueError(
                f'the optimizer brings {_describe(source)}, but the RepOptVGG '
                f'backbone {held} other scales ({_describe(self.scales or "const")}); give '
                'the scales in one place (model.backbone.scales or optim_wrapper.scales)')

    def target_state_dict(self) -> Dict[str, Tensor]:
        """For 'hs' / 'csla': the state_dict of the equivalent ``mode='target'`` model.

        Every CSLA block becomes ``conv.weight`` (its merged kernel) and its BN.
        """
        if self.mode == 'target':
            raise ValueError("RepOptVGG(mode='target') is already the target model")
        state = {}
        for name, block in self.repopt_blocks().items():
            state.update({f'{name}.{key}': value
                          for key, value in block.target_state_dict().items()})
        return state


def _has_identity(block: ReparamBlock) -> bool:
    return block.in_channels == block.out_channels and block.stride == 1


def constant_scales(backbone: RepOptVGG) -> Scales:
    """The HS model's initial scales (the paper's "same as HS initialization").

    The stem and the first block of each stage get 1, the ``l``-th later block of a stage
    ``sqrt(2 / l)`` (the official ``conv_scale_init``), for ``s`` and ``t``; the identity
    factor 1. Float32 on the CPU.
    """
    scales = {}
    for name, block in backbone.repopt_blocks().items():
        index = 0 if name == 'stem' else int(name.rsplit('.', 1)[1])
        value = 1.0 if index == 0 else math.sqrt(2.0 / index)
        channels = block.out_channels
        entry = dict(conv=torch.full((channels, ), value, device='cpu'),
                     conv_1x1=torch.full((channels, ), value, device='cpu'))
        if _has_identity(block):
            entry['identity'] = torch.ones(channels, device='cpu')
        scales[name] = entry
    return scales


# --------------------------------------------------------------------------------------
# Scales files


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return 'constant scales' if source == 'const' else f'scales file {os.fspath(source)!r}'
    return 'scales dict'


def _copy_scales(scales: Scales) -> Scales:
    return {name: {key: value.detach().clone() for key, value in entry.items()}
            for name, entry in scales.items()}


def _same_scales(a: Scales, b: Scales) -> bool:
    if a.keys() != b.keys():
        return False
    for name in a:
        if a[name].keys() != b[name].keys():
            return False
        for key in a[name]:
            if not torch.equal(a[name][key].double().cpu(), b[name][key].double().cpu()):
                return False
    return True


def _validate(scales: Mapping, source: str) -> Scales:
    """Check the structure of a scales dict; return it as float tensors."""
    out = {}
    for name, entry in scales.items():
        if not isinstance(name, str) or not isinstance(entry, Mapping):
            raise ScalesError(f'{source}: entry {name!r} is not a block name mapped to a '
                              f'dict of scales')
        unknown = set(entry) - set(SCALE_KEYS)
        missing = {'conv', 'conv_1x1'} - set(entry)
        if unknown or missing:
            raise ScalesError(f'{source}: block {name!r} has keys {sorted(entry)}; expected '
                              f"'conv', 'conv_1x1' and optionally 'identity'")
        values = {}
        for key, value in entry.items():
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 1:
                raise ScalesError(f'{source}: {name}.{key} is not a 1-d float tensor')
            if not torch.isfinite(value).all():
                raise ScalesError(f'{source}: {name}.{key} has non-finite values')
            values[key] = value.detach().float().cpu()
        if len({v.numel() for v in values.values()}) != 1:
            raise ScalesError(f'{source}: the scales of block {name!r} differ in length')
        out[name] = values
    if not out:
        raise ScalesError(f'{source}: no scales')
    return out


def _hs_block_name(name: str) -> str:
    """An official HS block name (``stage0``, ``stage1.0``) in mmreparam's naming."""
    if name == 'stage0':
        return 'stem'
    official = _OFFICIAL_STAGE.match(name)
    return 'stage_{}.{}'.format(*official.groups()) if official else name


def _scales_from_hs_state(state: Mapping, source: str) -> Scales:
    """The ``scale_*.weight`` tensors of an HS state_dict (mmreparam's or the official)."""
    for wrapper in ('state_dict', 'model'):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    tensors = {}
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            while key.startswith('module.'):
                key = key[len('module.'):]
            tensors[key] = value
    if any(key.startswith('backbone.') for key in tensors):
        tensors = {key[len('backbone.'):]: value for key, value in tensors.items()
                   if key.startswith('backbone.')}
    scales: Scales = {}
    for key, value in tensors.items():
        match = _HS_KEY.match(key)
        if match:
            block, branch = match.groups()
            scales.setdefault(_hs_block_name(block), {})[_HS_NAMES[branch]] = value
    if not scales:
        raise ScalesError(
            f"{source} is neither a scales file (no 'scales' dict) nor a hyper-search "
            f"checkpoint (no '*.scale_conv.weight' keys); its keys look like "
            f'{sorted(map(str, state))[:4]}')
    return scales


def load_scales(source: ScalesSource) -> Scales:
    """Read RepOpt scales from a file or a loaded object.

    Accepts a scales file (:func:`save_scales`), a scales dict, and hyper-search
    checkpoints: mmreparam's (an ``mode='hs'`` RepOptVGG, alone or as ``backbone.`` of a
    classifier) and the official ones (``stage0.scale_conv.weight``, ``stage1.0....``,
    under ``'model'`` or not), e.g. the released ``RepOpt-VGG-B1-scales.pth``. Files are
    read with :func:`mmreparam.checkpoint.safe_load`.

    Args:
        source (str | PathLike | Mapping): The file or object.

    Returns:
        dict: ``{block name: {'conv', 'conv_1x1'[, 'identity']: float32 tensor}}``.

    Raises:
        FileNotFoundError: The file does not exist.
        ScalesError: Unreadable, or no valid scales in it.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        from ...checkpoint import safe_load  # it imports the models layer
        if not os.path.exists(source):
            raise FileNotFoundError(f'{name} does not exist')
        try:
            obj = safe_load(source)
        except CheckpointError as err:
            raise ScalesError(f'cannot read {name}: {err}') from err
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise ScalesError(f'{name} holds a {type(obj).__name__}, not a dict')
    if isinstance(obj.get('scales'), Mapping):
        return _validate(obj['scales'], name)
    if obj and all(isinstance(v, Mapping) and 'conv' in v for v in obj.values()):
        return _validate(obj, name)  # a bare scales dict
    return _validate(_scales_from_hs_state(obj, name), name)


def save_scales(scales: Scales, path: Union[str, os.PathLike],
                meta: Optional[dict] = None) -> None:
    """Write a scales file atomically (``{'scales': ..., 'meta': ...}``, float32, CPU).

    Args:
        scales (dict): Block name -> ``{'conv', 'conv_1x1'[, 'identity']: tensor}``.
        path (str | PathLike): Output file; a previous file is replaced only on success.
        meta (dict, optional): Extra plain-Python metadata (arch, source, ...).
    """
    scales = _validate(scales, 'scales to save')
    save_checkpoint_atomic(dict(scales=scales, meta=dict(meta or {}, format=SCALES_FORMAT)),
                           os.fspath(path))


__all__ = ['RepOptVGG', 'CSLABlock', 'ScaleLayer', 'ScalesError', 'repopt_kernel',
           'repopt_grad_mult', 'constant_scales', 'load_scales', 'save_scales']
