"""Re-parameterize any CNN: its conv -> BN pairs become re-param blocks, exactly.

:func:`reparameterize` finds the pairs by following the data
(:func:`~mmreparam.apis.pairs.find_conv_bn_pairs`), puts a block of the chosen type in each
pair's place, expanded from the pair's current weights (the blocks' ``expansion_state``),
and checks by running both that the result computes the input's eval-mode function.
``type='mmreparam.Reparameterized'`` does it from a config, when the model is built; folding
gives the upstream model back (:func:`~mmreparam.apis.surgery.restore_upstream`) and
:func:`upstream_config` its config.
"""
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from torch import Tensor

from ..errors import ExpansionError
from ..models.layers.base import ReparamBlock
from ..models.layers.branches import ConvBN
from ..models.layers.factory import (
    REPARAM_TYPES,
    ReparamCfg,
    describe_choice,
    parse_reparam,
    reparam_block_type,
)
from ..models.layers.fuse import Affine
from ..registry import MODELS
from ..utils import without_pretrained
from .fold_check import fold_error
from .pairs import (
    ConvBNPair,
    _reference_tensor,
    convmodule_pairs,
    example_inputs,
    fixed_padding_view,
    search_pairs,
)
from .surgery import install_pair

#: The largest relative difference the check accepts between the input module and the
#: result, by the dtype of the module's parameters (the expansion is exact; float32 storage
#: rounds a large kernel's factors).
CHECK_TOLERANCE = {torch.float64: 1e-9}
DEFAULT_CHECK_TOLERANCE = 1e-5

#: Input sizes tried for a backbone's example image, in turn, until one runs.
EXAMPLE_SIZES = (32, 64, 128, 256)


@dataclass
class ReparamReport:
    """What :func:`reparameterize` did.

    Attributes:
        module (str): The class of the module.
        reparam (str): The ``reparam`` name.
        converted (list[tuple[str, str, str]]): ``(conv path, BN path, block class)`` of
            each pair replaced by a block.
        left_plain (list[tuple[str, str]]): ``(conv path, reason)`` of each conv -> BN pair
            left as it is.
        max_rel_error (float): Relative difference of the outputs measured by the check.
    """
    module: str
    reparam: str
    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    left_plain: List[Tuple[str, str]] = field(default_factory=list)
    max_rel_error: float = float('nan')

    @property
    def eligible(self) -> int:
        """Pairs the block type can take (converted, or failed to expand)."""
        return len(self.converted) + sum(1 for _, reason in self.left_plain
                                         if reason.startswith('expansion failed'))

    def summary(self) -> str:
        """One line: what was converted, and each pair left plain with its reason."""
        line = (f'{len(self.converted)} of {len(self.converted) + len(self.left_plain)} '
                f'conv->BN pairs of {self.module} became {self.reparam} blocks '
                f'(check: max rel error {self.max_rel_error:.1e})')
        by_reason = {}
        for path, reason in self.left_plain:
            by_reason.setdefault(reason, []).append(path)
        if by_reason:
            line += '; left plain: ' + '; '.join(f'{", ".join(paths)} ({reason})'
                                                 for reason, paths in by_reason.items())
        return line


def _block_type_problem(name: str, conv: nn.Conv2d) -> Tuple[Optional[type], Optional[str]]:
    """The block class for ``conv`` under ``reparam=name``, or why there is none."""
    k = conv.kernel_size[0]
    block_type = reparam_block_type(name, k, conv.groups)
    if block_type is ConvBN and name != 'base':
        grouped = f', groups={conv.groups}' if conv.groups > 1 else ''
        return None, (f'{name} replaces only kxk convs with {describe_choice(name)} (got '
                      f'{k}x{k}{grouped})')
    problem = block_type.replacement_problem(conv)
    return (None, problem) if problem else (block_type, None)


def _norm_cfg(norm: nn.Module) -> dict:
    """A ``norm_cfg`` that builds BatchNorms of ``norm``'s class and settings (affine)."""
    cfg = dict(type=type(norm), eps=norm.eps, momentum=norm.momentum)
    if norm.affine:
        cfg['requires_grad'] = norm.weight.requires_grad
    return cfg


def pair_kernel_affine(conv: nn.Conv2d, norm: nn.Module) -> Tuple[Tensor, Affine]:
    """The kernel of ``conv`` and the affine map after it: ``norm``'s, with the conv's bias
    (if any) moved into its mean."""
    affine = Affine.of(norm)
    if conv.bias is not None:
        affine = affine._replace(mean=affine.mean - conv.bias)
    return conv.weight, affine


def build_pair_block(block_type: type, block_args: dict, conv: nn.Conv2d,
                     norm: nn.Module) -> ReparamBlock:
    """A block of ``block_type`` computing ``norm(conv(x))`` in eval mode, all branches
    trainable (frozen when the conv's weight is), on the conv's device and dtype."""
    padding = fixed_padding_view(conv).padding[0]
    block = block_type(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                       stride=conv.stride[0], padding=padding,
                       dilation=conv.dilation[0], groups=conv.groups, norm_cfg=_norm_cfg(norm),
                       act_cfg=None, **block_args)
    weight = conv.weight
    block.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        block.load_state_dict(block.expansion_state(*pair_kernel_affine(conv, norm)))
    if not weight.requires_grad:
        block.requires_grad_(False)
    block.train(conv.training)
    return block


def _to_float64(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float64(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_float64(v) for k, v in obj.items()}
    return obj


def _check_function(module: nn.Module, result: nn.Module, inputs) -> float:
    """Relative output difference of ``result`` against ``module`` (eval mode), measured
    in float64 on copies (in the modules' dtype if they cannot run in float64); raises a
    RuntimeError above the tolerance."""
    dtype = _reference_tensor(module).dtype
    tolerance = CHECK_TOLERANCE.get(dtype, DEFAULT_CHECK_TOLERANCE)
    try:
        err = fold_error(copy.deepcopy(module).double(), copy.deepcopy(result).double(),
                         _to_float64(inputs))
    except Exception:  # noqa: BLE001 - some modules cannot run in float64
        err = fold_error(module, result, inputs)
        tolerance = max(tolerance, 1e-4)
    if not err['max_rel'] <= tolerance:
        raise RuntimeError(f'reparameterize({type(module).__name__}) does not compute the '
                           f'module\'s function: max rel error {err["max_rel"]:.3e} > '
                           f'{tolerance:g} {err["mismatches"] or ""}; nothing was changed')
    return err['max_rel']


def _check_pair(module: nn.Module, result: nn.Module, pair: ConvBNPair) -> float:
    """:func:`_check_function` for one pair (the block against the conv and BN), on a
    random ``9x9`` input."""
    conv = module.get_submodule(pair.conv)
    plain = nn.Sequential(conv, module.get_submodule(pair.norm))
    x = torch.randn(1, conv.in_channels, 9, 9, device=conv.weight.device,
                    dtype=conv.weight.dtype)
    return _check_function(plain, result.get_submodule(pair.conv), (x, ))


def reparameterize(module: nn.Module,
                   reparam: ReparamCfg = 'OREPA',
                   *,
                   inplace: bool = False,
                   example_inputs: Any = None,
                   input_sizes: Sequence[int] = EXAMPLE_SIZES) -> nn.Module:
    """Replace the conv -> BN pairs of any CNN by re-param blocks computing the same.

    The pairs are found by following the data on an example input
    (:func:`~mmreparam.apis.pairs.find_conv_bn_pairs`): a conv whose output goes into a
    BatchNorm and nowhere else. Each pair the block type can take (its
    ``replacement_problem``; the per-kernel-size rule of :func:`reparam_block_type`)
    becomes a block at the conv's place, expanded exactly from the pair's current weights
    (the kernel and BN in the origin branch, the other branches switched off, all
    trainable); the BN's place gets the identity. Nothing else changes: the module keeps
    its class, and its state_dict keys outside the replaced pairs. Pairs left plain are
    reported with their reason in one log line and in ``module.reparam_report``
    (:class:`ReparamReport`).

    Upstream checkpoints still load: the pair's plain keys are expanded on load. Folding
    (:func:`mmreparam.fold`) gives back the original classes and keys.

    The result is checked by execution before it is returned: it must compute the input
    module's eval-mode function (in float64, on copies); otherwise this raises and
    ``module`` is unchanged. A module that runs on no example input (a neck whose inputs
    its structure does not tell) falls back to the pairs mmcv's ``ConvModule`` s hold by
    construction, each checked on its own (a warning says so).

    Args:
        module (nn.Module): A backbone, a neck or any CNN.
        reparam (str | dict): A name ('OREPA', 'DBB', 'ACB', 'RepVGG', 'QARepVGG',
            'OREPA_VGG', 'base') or a dict with ``type`` and arguments of that block
            (``dict(type='DBB', internal_channels_1x1_3x3=8)``). Defaults to 'OREPA'.
        inplace (bool): Change ``module`` itself instead of a deep copy. Defaults to False.
        example_inputs (Tensor | tuple | dict, optional): Inputs to run ``module`` on (a
            tensor, a tuple of positional arguments, or a dict of keyword arguments).
            None builds them from the structure (:func:`example_inputs`): an image for a
            backbone, tried at each of ``input_sizes`` until one runs; feature maps for a
            neck (``in_channels`` a list). Defaults to None.
        input_sizes (Sequence[int]): Image sizes to try. Defaults to (32, 64, 128, 256).

    Returns:
        nn.Module: The re-parameterized module (``module`` itself when ``inplace``).

    Raises:
        ValueError: Unknown ``reparam`` or block argument; no pair the block type can take
            (the message names the module and the reasons); no example input runs.
        RuntimeError: The result does not compute the module's function.
    """
    name, block_args = parse_reparam(reparam)
    try:
        pairs, inputs = search_pairs(module, example_inputs, input_sizes)
    except ValueError as err:
        pairs, inputs = convmodule_pairs(module), None
        if example_inputs is not None or not pairs:
            raise
        print_log(f'mmreparam.reparameterize: {err}; taking the conv -> BN pairs of its '
                  f'{len(pairs)} ConvModule(s) from their structure, checked pair by pair',
                  logger='current', level=logging.WARNING)
    report = ReparamReport(type(module).__name__, name)
    plan: List[Tuple[ConvBNPair, type]] = []
    for pair in pairs:
        problem = pair.problem
        block_type = None
        if problem is None:
            block_type, problem = _block_type_problem(
                name, fixed_padding_view(module.get_submodule(pair.conv)))
        if problem is None:
            plan.append((pair, block_type))
        else:
            report.left_plain.append((pair.conv, problem))
    if not plan:
        reasons = ''.join(f'; {path}: {reason}' for path, reason in report.left_plain[:5])
        raise ValueError(f'{type(module).__name__} has no conv -> BN pair that {name} can '
                         f'replace ({len(pairs)} pair(s) found{reasons})')

    result = copy.deepcopy(module)
    built = []
    for pair, block_type in plan:
        conv, norm = result.get_submodule(pair.conv), result.get_submodule(pair.norm)
        try:
            block = build_pair_block(block_type, block_args, conv, norm)
        except ExpansionError as err:
            report.left_plain.append((pair.conv, f'expansion failed: {err}'))
            continue
        install_pair(result, pair.conv, pair.norm, block, conv, norm)
        built.append((pair, block))
        report.converted.append((pair.conv, pair.norm, block_type.__name__))
    if not built:
        raise ValueError(f'no block of {name} could be expanded in {type(module).__name__}: '
                         f'{report.summary()}')
    if inputs is None:
        report.max_rel_error = max(_check_pair(module, result, pair) for pair, _ in built)
    else:
        report.max_rel_error = _check_function(module, result, inputs)
    if inplace:
        for pair, block in built:
            install_pair(module, pair.conv, pair.norm, block, module.get_submodule(pair.conv),
                         module.get_submodule(pair.norm))
        result = module
    object.__setattr__(result, 'reparam_report', report)
    print_log(f'mmreparam.reparameterize: {report.summary()}', logger='current')
    return result


def is_reparameterized_type(value: Any) -> bool:
    """Whether a config's ``type`` names :func:`build_reparameterized`."""
    return value in ('mmreparam.Reparameterized', 'Reparameterized') \
        or value is build_reparameterized


def upstream_config(cfg: Any) -> Any:
    """The config without mmreparam's wrapper: every ``type='mmreparam.Reparameterized'``
    dict replaced by its ``module`` (a deep copy; anything else unchanged), at any depth.

    A folded re-parameterized model (:func:`mmreparam.fold`) has the state_dict of the
    model this config builds.

    Args:
        cfg (dict | list | Any): A model config or any part of one (a ``Config``'s
            ``model``, a backbone's dict, ...).

    Returns:
        The same structure with the inner modules' configs in place of the wrappers.
    """
    if isinstance(cfg, Mapping):
        if is_reparameterized_type(cfg.get('type')):
            if 'module' not in cfg:
                raise ValueError(f'a mmreparam.Reparameterized config needs module=: {cfg}')
            return upstream_config(cfg['module'])
        items = {key: upstream_config(value) for key, value in cfg.items()}
        return ConfigDict(items) if isinstance(cfg, ConfigDict) else items
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(upstream_config(item) for item in cfg)
    return copy.deepcopy(cfg)


def unwrap_for_deploy(cfg: Any) -> Tuple[Any, int]:
    """:func:`upstream_config` for a deploy config: each wrapper's inner module config, its
    ``Pretrained`` init dropped (the weights come from the deploy checkpoint).

    Returns:
        tuple: The config without wrappers, and how many wrappers it had.
    """
    if isinstance(cfg, Mapping):
        if is_reparameterized_type(cfg.get('type')):
            inner, _ = unwrap_for_deploy(upstream_config(cfg))
            inner = dict(inner)
            if 'init_cfg' in inner:
                init_cfg = without_pretrained(inner['init_cfg'])
                if init_cfg is None:
                    inner.pop('init_cfg')
                else:
                    inner['init_cfg'] = init_cfg
            return inner, 1
        count, items = 0, {}
        for key, value in cfg.items():
            items[key], n = unwrap_for_deploy(value)
            count += n
        return (ConfigDict(items) if isinstance(cfg, ConfigDict) else items), count
    if isinstance(cfg, (list, tuple)):
        pairs = [unwrap_for_deploy(item) for item in cfg]
        return type(cfg)(item for item, _ in pairs), sum(n for _, n in pairs)
    return cfg, 0


@MODELS.register_module(name='Reparameterized')
def build_reparameterized(module: Union[dict, ConfigDict],
                          reparam: ReparamCfg = 'OREPA',
                          input_sizes: Sequence[int] = EXAMPLE_SIZES) -> nn.Module:
    """Build ``module`` through the registry and re-parameterize it, at build time.

    Registered as ``mmreparam.Reparameterized``: usable as a backbone or a neck in mmdet,
    mmseg and mmpretrain configs without ``custom_imports``::

        backbone=dict(type='mmreparam.Reparameterized', reparam='OREPA',
                      module=dict(type='mmdet.CSPNeXt', arch='P5', ...))

    It returns the upstream module itself, re-parameterized in place
    (:func:`reparameterize`), so the model's state_dict keys outside the replaced pairs are
    the upstream ones, with no extra level. The surgery happens here, when the model is
    built (mmengine's Runner wraps the model in DDP and builds the optimizer before
    ``init_weights()``); upstream weights loaded later (the module's
    ``init_cfg=dict(type='Pretrained', ...)``, a whole-model ``load_from``) are expanded
    into the blocks on load. ``norm_eval``, ``frozen_stages`` and ``with_cp`` keep their
    upstream meaning (the blocks are children of the same stages).

    Args:
        module (dict): The config of the upstream module (``type`` with or without a scope:
            an unscoped type resolves in the current default scope, as in the config).
        reparam (str | dict): See :func:`reparameterize`. Defaults to 'OREPA'.
        input_sizes (Sequence[int]): Image sizes to try for the example input.

    Returns:
        nn.Module: The upstream module with re-param blocks.
    """
    if not isinstance(module, Mapping) or 'type' not in module:
        raise ValueError(f'mmreparam.Reparameterized needs module=dict(type=..., ...), got '
                         f'{module!r}')
    parse_reparam(reparam)
    inner = MODELS.build(copy.deepcopy(module))
    return reparameterize(inner, reparam, inplace=True, input_sizes=input_sizes)


__all__ = ['reparameterize', 'ReparamReport', 'upstream_config', 'build_reparameterized',
           'example_inputs', 'build_pair_block', 'pair_kernel_affine', 'REPARAM_TYPES']
