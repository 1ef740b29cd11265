"""OREPA: Online Convolutional Re-parameterization (Hu et al., CVPR 2022).

OREPA replaces DBB's per-branch BatchNorms by learned per-channel scales (``vector``), so
the whole block is *linear* in its parameters before its single BN: training generates one
kernel from the over-parameterized branches, runs one convolution and one BN. The fold is
then only the BN fusion of the generated kernel.

Parameter names follow the official implementation (JUGGHM/OREPA_CVPR2022), so that its
training checkpoints map by key renaming. The helper tensors (identity, frequency prior) are
non-persistent (or computed on the fly) here: they do not belong in checkpoints.
"""
import contextlib
import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor

from ...errors import ExpansionError
from ...registry import MODELS
from ...utils import autocast_off
from . import orepa_function as fn
from .base import ReparamBlock, build_bn, put, put_bn
from .branches import RepVGGBlock
from .fuse import (
    FACTOR_TOLERANCE,
    Affine,
    compose_kernels,
    factor_into_3x3,
    frequency_prior,
    fuse_bn,
    identity_kernel,
)

#: Initial branch scales of the official OREPA block (rows of ``vector``).
OREPA_VECTOR_INIT = dict(origin=0.25, avg=0.25, prior=0.0, conv1x1_kxk=0.5, conv1x1=1.0,
                         dw_pw=0.5)


class OREPAGeneratorMixin:
    """The kernel generator of OREPA, shared by :class:`OREPA` and :class:`OREPAKernel`.

    Branches, each scaled per output channel by a row of ``vector``:

    - ``origin``: a ``kxk`` kernel;
    - ``avg``: a ``1x1`` followed by ``kxk`` averaging;
    - ``prior``: a ``1x1`` followed by a fixed per-channel frequency prior (DCT basis);
    - ``conv1x1_kxk``: an identity-initialised ``1x1`` followed by a ``kxk``;
    - ``conv1x1``: a ``1x1`` (optional: the OREPA-VGG generator has none);
    - ``dw_pw``: a depthwise ``kxk`` (8 filters per input channel) followed by a ``1x1``.
    """
    #: The kernel generated for this module by :func:`batched_kernel_generation`, while
    #: it runs (not state: never saved, cleared on exit).
    _batched_kernel: Optional[Tensor] = None

    def _init_generator(self,
                        in_channels: int,
                        out_channels: int,
                        kernel_size: int,
                        groups: int,
                        internal_channels: Optional[int] = None,
                        with_conv1x1: bool = True,
                        expand_ratio: int = 8,
                        kaiming_a: float = 0.0,
                        vector_init: Optional[dict] = None):
        if internal_channels is None:  # the official rule
            internal_channels = in_channels if groups <= 4 else 2 * in_channels
        if internal_channels % groups:
            raise ValueError(f'internal_channels ({internal_channels}) must be divisible by '
                             f'groups ({groups})')
        i_g, k = in_channels // groups, kernel_size
        self.gen_in_channels = in_channels
        self.gen_out_channels = out_channels
        self.gen_kernel_size = kernel_size
        self.gen_groups = groups
        self.internal_channels = internal_channels
        self.branch_names: Tuple[str, ...] = (
            ('origin', 'avg', 'prior', 'conv1x1_kxk') + (('conv1x1', ) if with_conv1x1 else ())
            + ('dw_pw', ))

        def param(*shape):
            weight = nn.Parameter(torch.empty(*shape))
            nn.init.kaiming_uniform_(weight, a=kaiming_a)
            return weight

        self.weight_orepa_origin = param(out_channels, i_g, k, k)
        self.weight_orepa_avg_conv = param(out_channels, i_g, 1, 1)
        self.weight_orepa_pfir_conv = param(out_channels, i_g, 1, 1)
        if with_conv1x1:
            self.weight_orepa_1x1 = param(out_channels, i_g, 1, 1)
        # Offset from the identity (zero-initialised): the branch starts as a plain kxk.
        self.weight_orepa_1x1_kxk_idconv1 = nn.Parameter(
            torch.zeros(internal_channels, i_g, 1, 1))
        self.weight_orepa_1x1_kxk_conv2 = param(out_channels, internal_channels // groups, k, k)
        self.weight_orepa_gconv_dw = param(in_channels * expand_ratio, 1, k, k)
        self.weight_orepa_gconv_pw = param(out_channels, in_channels * expand_ratio // groups,
                                           1, 1)
        init = dict(OREPA_VECTOR_INIT, **(vector_init or {}))
        self.vector = nn.Parameter(
            torch.tensor([[init[name]] * out_channels for name in self.branch_names]))
        self.register_buffer('id_tensor',
                             identity_kernel(internal_channels, 1, groups,
                                             in_channels=in_channels), persistent=False)

    def frequency_prior(self) -> Tensor:
        """The fixed ``(out, k, k)`` prior, computed in float64 and cast to the params' dtype.

        Computed on the fly (it costs ``out * k * k`` cosines), so it is exact in any dtype the
        module is converted to.
        """
        return frequency_prior(self.gen_out_channels, self.gen_kernel_size,
                               dtype=self.vector.dtype, device=self.vector.device)

    def origin_state(self, kernel: Tensor) -> Dict[str, Tensor]:
        """The generator's tensors that make it generate ``kernel``: the kernel in the
        origin branch (its ``vector`` row 1), every other branch scaled by 0."""
        vector = torch.zeros(len(self.branch_names), kernel.shape[0], dtype=torch.float64)
        vector[self.branch_names.index('origin')] = 1
        return {'weight_orepa_origin': kernel, 'vector': vector}

    def generate_kernel(self) -> Tensor:
        """The generated ``(out, in/groups, k, k)`` kernel (differentiable).

        Inside :func:`batched_kernel_generation` it is the kernel generated there for all
        generators of this shape at once; otherwise it is generated here (a batch of one).
        """
        if self._batched_kernel is not None:
            return self._batched_kernel
        return self.generate_batch([self])[0]

    def batch_key(self) -> Optional[tuple]:
        """Generators with the same key generate their kernels as one batch; None when the
        module holds no generator (folded)."""
        origin = getattr(self, 'weight_orepa_origin', None)
        if origin is None:
            return None
        return ('orepa_kxk', self.branch_names, self.gen_groups, tuple(origin.shape),
                tuple(self.weight_orepa_1x1_kxk_conv2.shape),
                tuple(self.weight_orepa_gconv_dw.shape), tuple(self.id_tensor.shape),
                origin.dtype, origin.device, origin.requires_grad)

    def _batch_constants(self, batch: int) -> Tuple[Tensor, Tensor]:
        """The fixed inputs of a batch of ``batch`` generators like this one: the
        ``(batch * out, p, kk)`` patterns (average, prior, centre) and the identity added
        to the ``1x1`` of the ``1x1 -> kxk`` branch, ``(batch * internal, in/groups, 1, 1)``."""
        k = self.gen_kernel_size
        out = self.gen_out_channels
        prior = self.frequency_prior().reshape(out, k * k)
        patterns = [torch.full_like(prior[:1], 1.0 / (k * k)).expand(out, k * k), prior]
        if 'conv1x1' in self.branch_names:
            centre = torch.zeros_like(prior[:1])
            centre[0, (k * k) // 2] = 1
            patterns.append(centre.expand(out, k * k))
        pattern = torch.stack(patterns, dim=1)
        if batch == 1:
            return pattern, self.id_tensor
        return pattern.repeat(batch, 1, 1), self.id_tensor.repeat(batch, 1, 1, 1)

    @staticmethod
    def generate_batch(generators, constants: Optional[dict] = None) -> Tuple[Tensor, ...]:
        """The kernels of generators with one :meth:`batch_key`, as one computation.

        ``B`` generators with ``g`` groups each are exactly one generator with ``B * g``
        groups whose parameters are theirs concatenated along the output channels: one
        :class:`~mmreparam.models.layers.orepa_function.OREPABatchKernelFunction` node computes
        all the kernels (and, backwards, all the gradients), and each kernel is a view of
        its output. The branches that are a ``1x1`` weight times a fixed per-channel ``kxk``
        pattern (average, prior, centre tap) enter it as one ``(out, p, in/groups)`` weight
        tensor with their ``(p, out)`` scales.

        Args:
            generators (list): Modules with the same :meth:`batch_key`.
            constants (dict, optional): A cache of the fixed inputs by batch key (kept by
                the caller across steps); None computes them.

        Returns:
            tuple[Tensor]: One ``(out, in/groups, k, k)`` kernel per generator.
        """
        first, batch = generators[0], len(generators)
        names, out = first.branch_names, first.gen_out_channels
        if constants is None:
            pattern, identity = first._batch_constants(batch)
        else:
            key = (batch, first.batch_key())
            if key not in constants:  # normal tensors, even if first made in inference mode
                with torch.no_grad(), torch.inference_mode(False):
                    constants[key] = first._batch_constants(batch)
            pattern, identity = constants[key]
        coef_names = [('avg', 'weight_orepa_avg_conv'), ('prior', 'weight_orepa_pfir_conv')]
        if 'conv1x1' in names:
            coef_names.append(('conv1x1', 'weight_orepa_1x1'))
        attrs = ['weight_orepa_origin', *(attr for _, attr in coef_names),
                 'weight_orepa_1x1_kxk_idconv1', 'weight_orepa_1x1_kxk_conv2',
                 'weight_orepa_gconv_dw', 'weight_orepa_gconv_pw', 'vector']
        params = [getattr(g, attr) for attr in attrs for g in generators]
        index = names.index
        layout = fn.KxkBatchLayout(batch, first.gen_groups, len(coef_names), index('origin'),
                                tuple(index(name) for name, _ in coef_names),
                                index('conv1x1_kxk'), index('dw_pw'), fn.passes_for(params[0]))
        with autocast_off(params[0].device.type):
            kernel = fn.OREPABatchKernelFunction.apply(layout, pattern, identity, *params)
        return kernel.split(out)


def orepa_kernel_reference(generator) -> Tensor:
    """OREPA's generated kernel written as the paper's branch equations, one einsum each.

    The documented reference form of what :meth:`OREPAGeneratorMixin.generate_batch` computes
    in one fused node (:func:`~.orepa_function.orepa_kernel`): each branch kernel is formed
    in full and scaled by its row of ``vector``, then all are summed, as in the paper (Hu et
    al., CVPR 2022, Sec. 3) and the official code. Readable and slow; the tests check the
    generators' kernels and gradients against it (``groups == 1``).

    Args:
        generator: An :class:`OREPA` block or an :class:`OREPAKernel`.

    Returns:
        Tensor: ``(out, in, k, k)``, differentiable in the generator's parameters.
    """
    if generator.gen_groups != 1:
        raise ValueError('orepa_kernel_reference covers groups == 1 only')
    k = generator.gen_kernel_size
    v = dict(zip(generator.branch_names, generator.vector))

    def scaled(kernel, name):
        return torch.einsum('oihw,o->oihw', kernel, v[name])

    avg = torch.einsum('oi,hw->oihw', generator.weight_orepa_avg_conv[:, :, 0, 0],
                       torch.full((k, k), 1.0 / (k * k), dtype=v['avg'].dtype,
                                  device=v['avg'].device))
    prior = torch.einsum('oi,ohw->oihw', generator.weight_orepa_pfir_conv[:, :, 0, 0],
                         generator.frequency_prior())
    conv1 = (generator.weight_orepa_1x1_kxk_idconv1 + generator.id_tensor)[:, :, 0, 0]
    seq = torch.einsum('ti,othw->oihw', conv1, generator.weight_orepa_1x1_kxk_conv2)
    i = generator.gen_in_channels
    dw = generator.weight_orepa_gconv_dw.reshape(i, -1, k, k)
    pw = generator.weight_orepa_gconv_pw[:, :, 0, 0].reshape(-1, i, dw.shape[1])
    dwpw = torch.einsum('ithw,oit->oihw', dw, pw)
    kernel = (scaled(generator.weight_orepa_origin, 'origin') + scaled(avg, 'avg')
              + scaled(prior, 'prior') + scaled(seq, 'conv1x1_kxk') + scaled(dwpw, 'dw_pw'))
    if 'conv1x1' in v:
        kernel = kernel + scaled(F.pad(generator.weight_orepa_1x1, [k // 2] * 4), 'conv1x1')
    return kernel


class GeneratedKernelBlock(ReparamBlock):
    """A block whose training form is: generate one kernel -> one conv -> one BN.

    Subclasses implement ``generate_kernel()`` (differentiable); the forward pass and the fold
    (BN fusion of the generated kernel) are shared.
    """

    def generate_kernel(self) -> Tensor:
        """The ``(out, in/groups, k, k)`` kernel of the linear part before the BN."""
        raise NotImplementedError

    def _forward_branches(self, x: Tensor) -> Tensor:
        return self.bn(F.conv2d(x, self.generate_kernel(), None, self.stride, self.padding,
                                self.dilation, self.groups))

    def get_equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        """The generated kernel with the BN folded in."""
        return fuse_bn(self.generate_kernel(), self.bn)

    def kernel_and_affine(self) -> Tuple[Tensor, Affine]:
        """The generated kernel and the BN (kept as it is)."""
        if self.reparam_conv is not None:
            return super().kernel_and_affine()
        return self.generate_kernel(), Affine.of(self.bn)

    def _expand_branches(self, state: Dict[str, Tensor], kernel: Tensor,
                         affine: Affine) -> None:
        state.update(self._generator_state(kernel))
        put_bn(state, 'bn.', self.bn, affine)

    def _generator_state(self, kernel: Tensor) -> Dict[str, Tensor]:
        """The generator tensors with which :meth:`generate_kernel` gives ``kernel``."""
        raise NotImplementedError


class OREPAKernel(OREPAGeneratorMixin, nn.Module):
    """An OREPA kernel generator on its own (no convolution, no BN).

    Used as the stacked ``3x3`` generators of :class:`OREPALargeConv`. ``forward()`` takes
    no input and returns the kernel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 groups: int = 1, **generator_kwargs):
        super().__init__()
        self._init_generator(in_channels, out_channels, kernel_size, groups, **generator_kwargs)

    def forward(self) -> Tensor:
        """Return the generated kernel."""
        return self.generate_kernel()


@MODELS.register_module()
class OREPA(OREPAGeneratorMixin, GeneratedKernelBlock):
    """OREPA ``kxk`` block: generated kernel -> one conv -> one BN (-> act).

    Args:
        internal_channels_1x1_3x3 (int, optional): Width of the ``1x1 -> kxk`` branch;
            None gives ``in_channels`` when ``groups <= 4``, else ``2 * in_channels``
            (official rule). Defaults to None.
        with_conv1x1 (bool): Include the plain ``1x1`` branch. Defaults to True.
        kaiming_a (float): ``a`` of the Kaiming-uniform initialisation. Defaults to 0.
        vector_init (dict, optional): Initial branch scales by branch name, overriding
            :data:`OREPA_VECTOR_INIT`. Defaults to None.
        Others: see :class:`ReparamBlock`.
    """
    state_markers = ('weight_orepa_origin', )
    reparam_names = ('OREPA', )
    default_kernel_size = 3

    def __init__(self, *args, internal_channels_1x1_3x3: Optional[int] = None,
                 with_conv1x1: bool = True, kaiming_a: float = 0.0,
                 vector_init: Optional[dict] = None, **kwargs):
        self._generator_args = dict(internal_channels=internal_channels_1x1_3x3,
                                    with_conv1x1=with_conv1x1, kaiming_a=kaiming_a,
                                    vector_init=vector_init)
        super().__init__(*args, **kwargs)

    def _build_branches(self) -> None:
        self._init_generator(self.in_channels, self.out_channels, self.kernel_size,
                             self.groups, **self._generator_args)
        self.bn = build_bn(self.norm_cfg, self.out_channels)

    def _generator_state(self, kernel: Tensor) -> Dict[str, Tensor]:
        return self.origin_state(kernel)


@MODELS.register_module()
class OREPA1x1(GeneratedKernelBlock):
    """OREPA ``1x1`` block: ``v0 * W + v1 * (C2 @ C1)``, then one conv and one BN.

    The product branch has an identity factor (a trainable matrix initialised to the
    identity) on the side of the smaller channel count, as in the official ``OREPA_1x1``.
    Groups are not supported (as in the official block). See :class:`ReparamBlock`.
    """
    _supports_groups = False
    _batched_kernel: Optional[Tensor] = None  # see OREPAGeneratorMixin
    state_markers = ('weight_or1x1_origin', )
    reparam_names = ('OREPA', )
    chosen_kernel_sizes = (1, 1)
    default_kernel_size = 1

    @classmethod
    def _kernel_size_problem(cls, kernel_size: int) -> Optional[str]:
        if kernel_size != 1:
            return 'kernel_size=1; use OREPA or OREPALargeConv'
        return None

    def _build_branches(self) -> None:
        in_channels, out_channels = self.in_channels, self.out_channels

        def param(*shape):
            weight = nn.Parameter(torch.empty(*shape))
            nn.init.kaiming_uniform_(weight, a=1.0)
            return weight

        self.weight_or1x1_origin = param(out_channels, in_channels, 1, 1)
        if out_channels > in_channels:
            self.weight_or1x1_l2i_conv1 = nn.Parameter(
                torch.eye(in_channels).reshape(in_channels, in_channels, 1, 1))
            self.weight_or1x1_l2i_conv2 = param(out_channels, in_channels, 1, 1)
        else:
            self.weight_or1x1_l2i_conv1 = param(out_channels, in_channels, 1, 1)
            self.weight_or1x1_l2i_conv2 = nn.Parameter(
                torch.eye(out_channels).reshape(out_channels, out_channels, 1, 1))
        self.vector = nn.Parameter(torch.tensor([[1.0] * out_channels, [0.5] * out_channels]))
        self.bn = build_bn(self.norm_cfg, out_channels)

    def generate_kernel(self) -> Tensor:
        """The generated ``(out, in, 1, 1)`` kernel (differentiable); inside
        :func:`batched_kernel_generation`, the one generated there."""
        if self._batched_kernel is not None:
            return self._batched_kernel
        return self.generate_batch([self])[0]

    def _generator_state(self, kernel: Tensor) -> Dict[str, Tensor]:
        vector = torch.zeros(2, self.out_channels, dtype=torch.float64)
        vector[0] = 1  # the plain 1x1 only; the product branch scaled by 0
        return {'weight_or1x1_origin': kernel, 'vector': vector}

    def batch_key(self) -> Optional[tuple]:
        """Blocks with the same key generate their kernels as one batch; None once folded."""
        origin = getattr(self, 'weight_or1x1_origin', None)
        if origin is None:
            return None
        return ('orepa_1x1', tuple(origin.shape), tuple(self.weight_or1x1_l2i_conv2.shape),
                tuple(self.weight_or1x1_l2i_conv1.shape), origin.dtype, origin.device,
                origin.requires_grad)

    @staticmethod
    def generate_batch(blocks, constants: Optional[dict] = None) -> Tuple[Tensor, ...]:
        """The kernels of blocks with one :meth:`batch_key` as one batched computation
        (``constants`` is unused: this generator has no fixed inputs)."""
        batch = len(blocks)
        out, in_ = blocks[0].weight_or1x1_origin.shape[:2]
        params = [getattr(b, attr) for attr in ('weight_or1x1_origin', 'weight_or1x1_l2i_conv2',
                                                'weight_or1x1_l2i_conv1', 'vector')
                  for b in blocks]
        with autocast_off(params[0].device.type):
            kernel = fn.OREPA1x1BatchKernelFunction.apply(fn.passes_for(params[0]), *params)
        return kernel.reshape(batch * out, in_, 1, 1).split(out)


@MODELS.register_module()
class OREPALargeConv(GeneratedKernelBlock):
    """OREPA large-kernel block: ``(k-1)/2`` stacked ``3x3`` generators -> one ``kxk``.

    The ``kxk`` kernel (odd ``k >= 5``) is the composition of ``(k-1)/2`` OREPA ``3x3``
    kernels (``weight0``, ``weight1``, ...; ``out_channels`` wide inside), then one conv and
    one BN. This is the deep linear stem of OREPA-ResNet (``7x7``: three generators). As in
    the official implementation, the generators after the first enter the composition
    spatially flipped (it chains cross-correlations), so official checkpoints keep their
    meaning. Groups are not supported. See :class:`ReparamBlock` for the arguments.
    """
    _supports_groups = False
    state_markers = ('weight0.weight_orepa_origin', )
    reparam_names = ('OREPA', )
    chosen_kernel_sizes = (7, None)
    default_kernel_size = 7

    @classmethod
    def _kernel_size_problem(cls, kernel_size: int) -> Optional[str]:
        if kernel_size < 5 or kernel_size % 2 == 0:
            return 'an odd kernel_size >= 5; use OREPA for 3x3'
        return None

    def _build_branches(self) -> None:
        self.num_generators = (self.kernel_size - 1) // 2
        for i in range(self.num_generators):
            self.add_module(f'weight{i}',
                            OREPAKernel(self.in_channels if i == 0 else self.out_channels,
                                        self.out_channels, 3))
        self.bn = build_bn(self.norm_cfg, self.out_channels)

    def generate_kernel(self) -> Tensor:
        """The composed ``(out, in, k, k)`` kernel (differentiable)."""
        kernel = self.weight0()
        for i in range(1, self.num_generators):
            kernel = compose_kernels(kernel, getattr(self, f'weight{i}')().flip(-2, -1))
        return kernel

    def _generator_state(self, kernel: Tensor) -> Dict[str, Tensor]:
        """Generators whose composition is ``kernel`` (:func:`~.fuse.factor_into_3x3`),
        checked by generating the kernel from them."""
        state = {}
        factors = factor_into_3x3(kernel, self.num_generators, self.out_channels)
        for i, factor in enumerate(factors):
            put(state, f'weight{i}.', getattr(self, f'weight{i}').origin_state(factor))
        probe = copy.deepcopy(self).to('cpu', torch.float64)
        probe.load_state_dict(state, strict=False)
        with torch.no_grad():
            error = (probe.generate_kernel() - kernel).abs().max() / kernel.abs().max()
        if error > FACTOR_TOLERANCE:
            raise ExpansionError(f'OREPALargeConv expansion is off by {error:.2e} (relative)')
        return state


@MODELS.register_module()
class OREPAVGGBlock(RepVGGBlock):
    """RepVGG block with an OREPA ``kxk`` branch (the official ``RepVGGBlock_OREPA``).

    ``OREPA-kxk-BN + 1x1-BN (+ identity-BN)``: the dense branch is an OREPA generator
    without its own ``1x1`` branch (RepVGG has one), initialised as in the official
    ``OREPA_3x3_RepVGG``. Arguments as :class:`RepVGGBlock`.
    """
    state_markers = ('rbr_dense.weight_orepa_origin', )
    reparam_names = ('OREPA_VGG', )

    def _build_branches(self) -> None:
        super()._build_branches()
        internal = self.in_channels if self.groups < self.out_channels else 2 * self.in_channels
        self.rbr_dense = OREPA(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.norm_cfg, act_cfg=None,
            internal_channels_1x1_3x3=internal, with_conv1x1=False, kaiming_a=1.0)

    def _expand_dense(self, state: Dict[str, Tensor], kernel: Tensor, affine: Affine) -> None:
        put(state, 'rbr_dense.', self.rbr_dense.expansion_state(kernel, affine))


#: The modules whose kernels :func:`batched_kernel_generation` generates in batches.
BATCHED_GENERATORS = (OREPAGeneratorMixin, OREPA1x1)


def generator_batches(module: nn.Module) -> Dict[tuple, List[nn.Module]]:
    """The OREPA generators in ``module`` (not folded, not inside a running batch), grouped
    by :meth:`~OREPAGeneratorMixin.batch_key`: each group can be generated as one batch."""
    batches: Dict[tuple, List[nn.Module]] = {}
    for m in module.modules():
        if isinstance(m, BATCHED_GENERATORS) and m._batched_kernel is None:
            key = m.batch_key()
            if key is not None:
                batches.setdefault(key, []).append(m)
    return batches


def _checkpointed(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and any(getattr(m, 'with_cp', False)
                                           for m in module.modules())


_logged_reasons = set()


@contextlib.contextmanager
def batched_kernel_generation(module: nn.Module, constants: Optional[dict] = None,
                              cpu: bool = False):
    """Within the block, the OREPA generators in ``module`` use kernels generated in batches.

    On entry, the kernels of all generators that share a shape are generated in one
    computation (:meth:`OREPAGeneratorMixin.generate_batch`, :meth:`OREPA1x1.generate_batch`):
    a training step runs one generator graph (forward and backward) per shape instead of
    one per generator (the counts for OREPA-ResNet-50 are in docs/en/benchmarks.md). Values
    and gradients are those of the per-layer generation; the parameters, their names and the
    checkpoints are unchanged. On exit the kernels are dropped.

    It applies on every device except the CPU, where the compiled per-layer passes
    (``mmreparam._ext``) are as fast; and not to modules with ``with_cp`` while gradients
    are recorded (their checkpointed recomputation generates the kernel again, per layer).
    Where it does not apply, the generators work per layer as before (said once in the log).

    Args:
        module (nn.Module): The model part whose generators are batched (a backbone).
        constants (dict, optional): A cache for the fixed inputs of the batches (patterns,
            identities), kept by the caller across steps. Defaults to None (computed).
        cpu (bool): Batch on the CPU too (for tests and benchmarks). Defaults to False.

    Yields:
        bool: Whether the kernels were generated in batches.
    """
    batches = generator_batches(module)
    device = next(iter(batches.values()))[0].vector.device if batches else None
    reason = None
    if device is not None and device.type == 'cpu' and not cpu:
        reason = 'on the CPU, per layer with the compiled passes'
    elif batches and _checkpointed(module):
        reason = ('per layer under with_cp (the checkpointed recomputation generates each '
                  'kernel again)')
    if not batches or reason is not None:
        if reason is not None and reason not in _logged_reasons:
            _logged_reasons.add(reason)
            print_log(f'mmreparam: OREPA kernels are generated {reason}', logger='current')
        yield False
        return
    assigned = []
    try:
        for generators in batches.values():
            kernels = generators[0].generate_batch(generators, constants)
            for generator, kernel in zip(generators, kernels):
                generator._batched_kernel = kernel
                assigned.append(generator)
        yield True
    finally:
        for generator in assigned:
            generator._batched_kernel = None
