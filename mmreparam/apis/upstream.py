"""The upstream deploy pair: a folded model as the upstream toolbox's own classes.

A deploy pair in mmreparam's form (``deploy_config.py`` naming ``mmreparam.ResNet`` with
``deploy=True``) needs mmreparam wherever it runs. Each of mmreparam's parts that has an
upstream class with the same architecture is rewritten here into that class: a folded
:class:`~mmreparam.models.ResNet` becomes mmdet's / mmseg's / mmpretrain's ``ResNet`` /
``ResNetV1c`` / ``ResNetV1d`` / ``ResNeXt``, a folded :class:`~mmreparam.models.RepVGG`
becomes mmpretrain's ``RepVGG(deploy=True)``. A folded block (one convolution with bias)
goes into the upstream convolution, and its bias into the BN after it, set to
identity-plus-bias (``running_mean`` 0, ``running_var`` ``1 - eps``, ``weight`` 1, ``bias``
b), so that the BN computes ``x + b`` in eval mode.

Every rewritten part is checked before it is returned: the upstream part loads the mapped
state strictly and computes what mmreparam's deploy part computes, in float64 on a random
input; the whole upstream model loads the whole state strictly.

The rewriting of each mmreparam type is one entry of :data:`UPSTREAM_CONVERTERS`.
"""
import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import DefaultScope
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import NoUpstreamForm
from ..models.layers.base import ReparamBlock
from ..models.layers.factory import ConvNormAct
from ..utils import without_pretrained
from .deploy import _set_deploy, deploy_cleanup, models_registry

StateDict = Dict[str, Tensor]

#: The toolboxes whose classes the upstream form uses, in order of preference when the
#: config's own scope has none of them (mmdet's ResNet is the common one).
TOOLBOXES = ('mmdet', 'mmseg', 'mmpretrain')

#: Largest relative difference between mmreparam's deploy part and the upstream part
#: accepted by the check (float64; a correct mapping gives ~1e-16).
CHECK_TOLERANCE = 1e-10

#: mmreparam types that are renamed to an upstream type with the same state and the same
#: eval-mode function: ``mmreparam.SyncBN`` (a SyncBatchNorm that also trains on CPU) becomes
#: a plain ``BN``, which is what inference needs (torch's ``SyncBN`` refuses CPU modules
#: under DDP, e.g. in ``tools/dist_test.sh`` on CPU).
RENAMED_TYPES = {'SyncBN': 'BN'}

_MMREPARAM_NAME = re.compile(r'^mmreparam(\.|$)')


@dataclass
class UpstreamDeploy:
    """The upstream deploy pair of a folded model.

    Attributes:
        config (Config): The deploy config: no mmreparam type, no mmreparam import.
        state_dict (dict[str, Tensor]): Loads strictly into the model built from ``config``.
        parts (list[str]): What was rewritten, one line each
            (``'backbone: mmreparam.ResNet -> mmdet.ResNetV1d'``).
    """
    config: Config
    state_dict: StateDict
    parts: List[str] = field(default_factory=list)


@dataclass
class _Context:
    """What a converter needs besides its node: the toolbox of the config."""
    scope: Optional[str]

    def type_name(self, toolbox: str, name: str) -> str:
        """``name`` as the config writes it: unscoped in the config's own toolbox."""
        return name if toolbox == self.scope else f'{toolbox}.{name}'


def is_mmreparam_type(type_name: Any) -> bool:
    """Whether a config's ``type`` names an mmreparam class (``'mmreparam.X'`` or the
    class itself)."""
    if isinstance(type_name, str):
        return bool(_MMREPARAM_NAME.match(type_name))
    module = getattr(type_name, '__module__', '') or ''
    return bool(_MMREPARAM_NAME.match(module))


def _type_key(type_name: Any) -> str:
    """``'ResNet'`` for ``'mmreparam.ResNet'`` or the class."""
    if isinstance(type_name, str):
        return type_name.split('.', 1)[1] if '.' in type_name else type_name
    return type_name.__name__


def _toolbox_of(cfg: Config) -> Optional[str]:
    """The config's toolbox: its ``default_scope``, else the scope of ``model.type``."""
    scope = cfg.get('default_scope')
    if not scope:
        model_type = cfg.model.get('type') if isinstance(cfg.get('model'), dict) else None
        if isinstance(model_type, str) and '.' in model_type:
            scope = model_type.split('.', 1)[0]
    return None if not scope or _MMREPARAM_NAME.match(scope) else scope


def _registry(toolbox: str):
    try:
        __import__(f'{toolbox}.registry')
    except ImportError as err:
        raise NoUpstreamForm(f'{toolbox} is not installed ({err})') from err
    return models_registry(toolbox)


def _build(toolbox: Optional[str], node: dict) -> nn.Module:
    """Build ``node`` with the registry of ``toolbox``, its scope set meanwhile."""
    registry = models_registry(toolbox)
    with DefaultScope.overwrite_default_scope(toolbox):
        return registry.build(copy.deepcopy(node))


def _accepted(cls: type) -> Dict[str, inspect.Parameter]:
    """The keyword arguments ``cls`` takes, following ``**kwargs`` up its bases."""
    params: Dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        more = False
        for name, param in inspect.signature(init).parameters.items():
            if param.kind is param.VAR_KEYWORD:
                more = True
            elif name != 'self' and param.kind is not param.VAR_POSITIONAL:
                params.setdefault(name, param)
        if not more:
            break
    return params


def _same(a: Any, b: Any) -> bool:
    """Equality of config values, sequences compared as tuples."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b if not isinstance(a, (int, float)) else a == b


def _sub_state(state: StateDict, prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _float_dtype(state: StateDict) -> torch.dtype:
    for value in state.values():
        if value.is_floating_point():
            return value.dtype
    return torch.float32


def _build_ours(node: dict, state: StateDict, scope: Optional[str], what: str) -> nn.Module:
    """mmreparam's part in its deploy form, in float64, holding ``state`` (strict)."""
    node = dict(copy.deepcopy(node), deploy=True, init_cfg=None)
    node.pop('pretrained', None)
    module = _build(scope, node).double()
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise NoUpstreamForm(f'{what}: the folded weights do not fit a deploy=True '
                             f'{node["type"]} ({str(err).splitlines()[0]})') from err
    module.eval()
    return module


def _upstream_part(toolbox: str, node: dict) -> nn.Module:
    """The upstream part of ``node`` in float64, eval mode (its weights are set after)."""
    module = _build(toolbox, dict(node, init_cfg=None)).double()
    module.eval()
    return module


def _check_same_function(ours: nn.Module, upstream: nn.Module, in_channels: int,
                         what: str) -> float:
    """Relative difference of the two parts' outputs (float64, eval, random input);
    raises NoUpstreamForm above :data:`CHECK_TOLERANCE`."""
    # 96: a 3x3 map after stride 32 (mmcv's DCN refuses maps smaller than its kernel)
    x = torch.randn(1, in_channels, 96, 96, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.eval()
        upstream.eval()  # (mmdet's ResNet.train() returns None)
        a, b = ours(x), upstream(x)
    a = a if isinstance(a, (list, tuple)) else (a, )
    b = b if isinstance(b, (list, tuple)) else (b, )
    if len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b)):
        raise NoUpstreamForm(f'{what}: the upstream part gives outputs of other shapes')
    scale = max(float(p.abs().max()) for p in a) or 1.0
    error = max(float((p - q).abs().max()) for p, q in zip(a, b)) / scale
    if not error <= CHECK_TOLERANCE:
        raise NoUpstreamForm(f'{what}: the upstream part computes something else (relative '
                             f'difference {error:.3g} in float64)')
    return error


class _Mapper:
    """Copies the state of mmreparam's deploy modules into upstream modules and records
    which modules of both sides it covered."""

    def __init__(self, ours: nn.Module, upstream: nn.Module, what: str):
        self.ours, self.upstream, self.what = ours, upstream, what
        self._names = {id(m): n for n, m in ours.named_modules()}
        self._names.update({id(m): n for n, m in upstream.named_modules()})
        self.covered_ours: List[str] = []
        self.covered_upstream: List[str] = []

    def _cover(self, ours: nn.Module, *upstream: nn.Module) -> None:
        self.covered_ours.append(self._names[id(ours)])
        self.covered_upstream.extend(self._names[id(m)] for m in upstream)

    def _copy(self, target: Tensor, value: Tensor, name: str) -> None:
        if target.shape != value.shape:
            raise NoUpstreamForm(f'{self.what}: {name} has shape {tuple(value.shape)} here and '
                                 f'{tuple(target.shape)} in the upstream class')
        with torch.no_grad():
            target.copy_(value)

    def same(self, ours: nn.Module, upstream: nn.Module) -> None:
        """A module kept as it is by the fold (plugins): the same state."""
        try:
            upstream.load_state_dict(ours.state_dict(), strict=True)
        except RuntimeError as err:
            raise NoUpstreamForm(f'{self.what}: {self._names[id(ours)]} does not fit the '
                                 f'upstream module ({str(err).splitlines()[0]})') from err
        self._cover(ours, upstream)

    def conv_norm(self, block: nn.Module, conv: nn.Module, norm: nn.Module) -> None:
        """A folded block, or a plain conv + norm, into an upstream conv and norm."""
        name = self._names[id(block)]
        if isinstance(block, ConvNormAct):
            self.same(block.conv, conv)
            self.same(block.norm, norm)
            self._cover(block)
            return
        if not isinstance(block, ReparamBlock) or not block.folded:
            raise NoUpstreamForm(f'{self.what}: {name} ({type(block).__name__}) is not a '
                                 'folded block')
        if not isinstance(conv, nn.Conv2d) or not isinstance(norm, _BatchNorm) \
                or not norm.affine or not norm.track_running_stats:
            raise NoUpstreamForm(f'{self.what}: the upstream layers of {name} are '
                                 f'{type(conv).__name__} + {type(norm).__name__}, not a conv '
                                 'and an affine BatchNorm with running statistics')
        folded = block.reparam_conv
        geometry = ('kernel_size', 'stride', 'padding', 'dilation', 'groups')
        differ = [f'{g} {getattr(folded, g)} here, {getattr(conv, g)} upstream'
                  for g in geometry if getattr(conv, g) != getattr(folded, g)]
        if differ:
            raise NoUpstreamForm(f'{self.what}: the upstream class has another conv at {name} '
                                 f'({", ".join(differ)})')
        self._copy(conv.weight, folded.weight, f'{name} kernel')
        bias = folded.bias
        if conv.bias is not None:  # the conv carries the bias, the BN is the identity
            self._copy(conv.bias, bias, f'{name} bias')
            bias = torch.zeros_like(bias)
        with torch.no_grad():  # identity plus bias: (x - 0) / sqrt(1 - eps + eps) * 1 + b
            self._copy(norm.bias, bias, f'{name} bias')
            norm.weight.fill_(1)
            norm.running_mean.zero_()
            norm.running_var.fill_(1 - norm.eps)
            norm.num_batches_tracked.zero_()
        self._cover(block, conv, norm)

    def check_complete(self) -> None:
        """Every state key of both sides is under a covered module."""
        for side, module, covered in (('mmreparam', self.ours, self.covered_ours),
                                      ('upstream', self.upstream, self.covered_upstream)):
            left = [k for k in module.state_dict()
                    if not any(k.startswith(c + '.') for c in covered)]
            if left:
                raise NoUpstreamForm(f'{self.what}: no counterpart for the {side} weights '
                                     f'{left[:3]}' + (' ...' if len(left) > 3 else ''))


def _conv_norm_pairs(sequence: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """The ``(conv, norm)`` pairs of a stem or shortcut, in order, whatever its nesting
    (mmdet's ``stem.0`` / ``stem.1``, mmpretrain's ``stem.0.conv`` / ``stem.0.bn``)."""
    convs, norms = [], []
    for module in sequence.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            convs.append(module)
        elif isinstance(module, (_BatchNorm, nn.GroupNorm)):
            norms.append(module)
    return list(zip(convs, norms)) if len(convs) == len(norms) else []


def _upstream_args(ours_cls: type, node: dict, up_cls: type, what: str,
                   skip: Sequence[str], neutral: Dict[str, Any]) -> dict:
    """The upstream constructor's arguments for ``node`` (mmreparam's arguments).

    Every argument of ours (its value in ``node``, else our default) goes to the upstream
    class when it takes it, written only where the config gave it or where the upstream
    default differs; an argument the upstream class lacks must have its ``neutral`` value.
    """
    ours_params = _accepted(ours_cls)
    up_params = _accepted(up_cls)
    args = {}
    for name, param in ours_params.items():
        if name in skip:
            continue
        given = name in node
        value = node[name] if given else param.default
        if name not in up_params:
            if name in neutral and _same(value, neutral[name]) or value is inspect.Parameter.empty:
                continue
            raise NoUpstreamForm(f'{what}: {up_cls.__module__.split(".")[0]}.'
                                 f'{up_cls.__name__} has no argument {name} (here {value!r})')
        up_default = up_params[name].default
        if given or up_default is inspect.Parameter.empty or not _same(value, up_default):
            args[name] = copy.deepcopy(value)
    return args


# ------------------------------------------------------------------------- converters

def _resnet_class(toolbox: str, deep_stem: bool, avg_down: bool, groups: int):
    """The upstream class name of a ResNet and whether it fixes deep_stem / avg_down."""
    if groups > 1:
        return 'ResNeXt', False
    registry = _registry(toolbox)
    name = {(True, True): 'ResNetV1d', (True, False): 'ResNetV1c'}.get((deep_stem, avg_down))
    if name and registry.get(name) is not None:
        return name, True
    return 'ResNet', False


def _resnet_toolbox(ctx: _Context) -> str:
    return ctx.scope if ctx.scope in TOOLBOXES else TOOLBOXES[0]


def convert_resnet(node: dict, state: StateDict, ctx: _Context, what: str
                   ) -> Tuple[dict, StateDict, str]:
    """A folded :class:`mmreparam.ResNet` as the upstream toolbox's ResNet family."""
    from ..models.backbones.resnet import ResNet
    ours = _build_ours(node, state, ctx.scope, what)
    toolbox = _resnet_toolbox(ctx)
    groups = node.get('groups', 1)
    name, fixes_stem = _resnet_class(toolbox, ours.deep_stem, ours.avg_down, groups)
    up_cls = _registry(toolbox).get(name)
    if up_cls is None:
        raise NoUpstreamForm(f'{what}: {toolbox} has no {name}')
    skip = ['reparam', 'deploy', 'pretrained', 'init_cfg', 'groups', 'base_width',
            'stem_channels']
    if fixes_stem:
        skip += ['deep_stem', 'avg_down']
    if node.get('dcn') is None:  # then stage_with_dcn means nothing
        skip += ['dcn', 'stage_with_dcn']
    if not node.get('plugins'):
        skip.append('plugins')
    neutral = dict(contract_dilation=False, multi_grid=None)
    args = _upstream_args(ResNet, node, up_cls, what, skip, neutral)
    up_params = _accepted(up_cls)
    args['stem_channels'] = ours.stem_channels  # defaults differ (None / 64)
    if groups > 1:
        width_key = 'base_width' if 'base_width' in up_params else 'width_per_group'
        args.update(groups=groups, **{width_key: node.get('base_width', 4)})
    init_cfg = without_pretrained(node.get('init_cfg'))
    if init_cfg is not None:
        args['init_cfg'] = init_cfg
    up_type = ctx.type_name(toolbox, name)
    up_node = dict(type=up_type, **args)
    upstream = _upstream_part(toolbox, up_node)

    mapper = _Mapper(ours, upstream, what)
    if ours.deep_stem:
        pairs = _conv_norm_pairs(upstream.stem)
        if len(pairs) != len(ours.stem):
            raise NoUpstreamForm(f'{what}: the upstream deep stem has {len(pairs)} conv + '
                                 f'norm layers, ours {len(ours.stem)}')
        for block, (conv, norm) in zip(ours.stem, pairs):
            mapper.conv_norm(block, conv, norm)
    else:
        mapper.conv_norm(ours.stem, upstream.conv1, upstream.norm1)
    for layer_name in ours.res_layers:
        ours_layer, up_layer = getattr(ours, layer_name), getattr(upstream, layer_name, None)
        if up_layer is None or len(up_layer) != len(ours_layer):
            raise NoUpstreamForm(f'{what}: the upstream {layer_name} has other units')
        for ours_unit, up_unit in zip(ours_layer, up_layer):
            for i in (1, 2, 3):
                if hasattr(ours_unit, f'conv{i}'):
                    mapper.conv_norm(getattr(ours_unit, f'conv{i}'),
                                     getattr(up_unit, f'conv{i}'), getattr(up_unit, f'norm{i}'))
            if ours_unit.downsample is not None:
                pairs = _conv_norm_pairs(up_unit.downsample or nn.Sequential())
                blocks = [m for m in ours_unit.downsample
                          if isinstance(m, (ReparamBlock, ConvNormAct))]
                if len(pairs) != 1 or len(blocks) != 1:
                    raise NoUpstreamForm(f'{what}: the upstream shortcut of '
                                         f'{layer_name} differs')
                mapper.conv_norm(blocks[0], *pairs[0])
            for position in ('after_conv1', 'after_conv2', 'after_conv3'):
                for plugin in getattr(ours_unit, f'{position}_plugin_names', []):
                    up_names = getattr(up_unit, f'{position}_plugin_names', [])
                    if plugin not in up_names:
                        raise NoUpstreamForm(f'{what}: the upstream unit has no plugin '
                                             f'{plugin} {position}')
                    mapper.same(getattr(ours_unit, plugin), getattr(up_unit, plugin))
    mapper.check_complete()
    _check_same_function(ours, upstream, node.get('in_channels', 3), what)
    return up_node, _cast_like(upstream.state_dict(), state), up_type


def convert_repvgg(node: dict, state: StateDict, ctx: _Context, what: str
                   ) -> Tuple[dict, StateDict, str]:
    """A folded :class:`mmreparam.RepVGG` as mmpretrain's ``RepVGG(deploy=True)``."""
    from ..models.backbones.repvgg import RepVGG
    ours = _build_ours(node, state, ctx.scope, what)
    arch = ours.arch
    if arch['se_cfg'] is not None:
        raise NoUpstreamForm(
            f'{what}: mmpretrain\'s RepVGG (1.2.0) drops the SE layer in its deploy form '
            '(its block returns branch_reparam(x) before the SE), so an SE arch has no '
            'upstream deploy class')
    toolbox = 'mmpretrain'
    up_cls = _registry(toolbox).get('RepVGG')
    if up_cls is None:
        raise NoUpstreamForm(f'{what}: mmpretrain has no RepVGG')
    given_arch = node.get('arch', 'A0')
    if isinstance(given_arch, str) and _same(up_cls.arch_settings.get(given_arch),
                                             RepVGG.arch_settings.get(given_arch)):
        up_arch = given_arch
    else:
        up_arch = dict(num_blocks=list(arch['num_blocks']),
                       width_factor=list(arch['width_factor']),
                       group_layer_map=arch['group_layer_map'], se_cfg=None)
        if arch['stem_channels'] is not None:
            up_arch['stem_channels'] = arch['stem_channels']
    args = _upstream_args(RepVGG, node, up_cls, what,
                          skip=('reparam', 'deploy', 'init_cfg', 'arch', 'out_indices'),
                          neutral={})
    args.update(arch=up_arch, out_indices=list(ours.out_indices), deploy=True)
    init_cfg = without_pretrained(node.get('init_cfg'))
    if init_cfg is not None and 'init_cfg' in node:
        args['init_cfg'] = init_cfg
    up_type = ctx.type_name(toolbox, 'RepVGG')
    up_node = dict(type=up_type, **args)
    upstream = _upstream_part(toolbox, up_node)
    renamed = {re.sub(r'(^|\.)reparam_conv\.', r'\1branch_reparam.', k): v
               for k, v in ours.state_dict().items()}
    try:
        upstream.load_state_dict(renamed, strict=True)
    except RuntimeError as err:
        raise NoUpstreamForm(f'{what}: the folded weights do not fit mmpretrain\'s RepVGG '
                             f'({str(err).splitlines()[0]})') from err
    _check_same_function(ours, upstream, node.get('in_channels', 3), what)
    return up_node, _cast_like(upstream.state_dict(), state), up_type


def convert_reparameterized(node: dict, state: StateDict, ctx: _Context, what: str
                            ) -> Tuple[dict, StateDict, str]:
    """``mmreparam.Reparameterized``: its fold gives back the upstream module with its own
    state_dict keys, so the config is its ``module`` and the state stays as it is."""
    from .reparameterize import unwrap_for_deploy
    if not isinstance(node.get('module'), dict) or 'type' not in node['module']:
        raise NoUpstreamForm(f'{what}: mmreparam.Reparameterized without a module config')
    inner, _ = unwrap_for_deploy(node)
    return inner, dict(state), str(inner['type'])


def _cast_like(state: StateDict, source: StateDict) -> StateDict:
    """``state``'s floating tensors in the floating dtype of ``source`` (the mapping runs in
    float64; the checkpoint keeps the folded model's precision)."""
    dtype = _float_dtype(source)
    return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


#: mmreparam type name -> converter ``(node, part state, context, what) ->
#: (upstream node, upstream part state, upstream type)``; raises NoUpstreamForm.
UPSTREAM_CONVERTERS: Dict[str, Callable[..., Tuple[dict, StateDict, str]]] = {
    'ResNet': convert_resnet,
    'RepVGG': convert_repvgg,
    'Reparameterized': convert_reparameterized,
}


# ------------------------------------------------------------------------- the whole model

def _walk(node: Any, path: str, visit: Callable[[dict, str], Optional[dict]]) -> Any:
    """Rebuild ``node`` with ``visit(dict, path)`` applied to every dict with a ``type``,
    top-down; a dict that ``visit`` replaces is not walked further."""
    if isinstance(node, dict):
        if 'type' in node:
            replaced = visit(node, path)
            if replaced is not None:
                return replaced
        out = type(node)() if not isinstance(node, ConfigDict) else ConfigDict()
        for key, value in node.items():
            out[key] = _walk(value, f'{path}.{key}' if path else str(key), visit)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_walk(v, f'{path}.{i}', visit) for i, v in enumerate(node))
    return node


def _mmreparam_values(node: Any, path: str = '') -> List[str]:
    """Paths of the config values that name mmreparam (types, imports)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _mmreparam_values(value, f'{path}.{key}' if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            found += _mmreparam_values(value, f'{path}.{i}')
    elif isinstance(node, str) and _MMREPARAM_NAME.match(node) or \
            isinstance(node, type) and is_mmreparam_type(node):
        found.append(f'{path}={node!r}' if isinstance(node, str) else path)
    return found


def _without_mmreparam_variables(cfg: Config) -> List[str]:
    """Drop the config's own variables that name mmreparam (a base's ``fold_hook =
    dict(type='mmreparam.FoldHook')``): top-level keys that mmengine's Runner does not
    read. Returns their names."""
    from mmengine.runner import Runner
    runner_keys = set(inspect.signature(Runner.__init__).parameters)
    dropped = [key for key, value in cfg.items()
               if key not in runner_keys and key != 'custom_imports'
               and _mmreparam_values(value)]
    for key in dropped:
        cfg.pop(key)
    return dropped


def _without_mmreparam_imports(cfg: Config) -> None:
    imports = cfg.get('custom_imports')
    if not imports:
        return
    names = imports.get('imports', [])
    names = [names] if isinstance(names, str) else list(names)
    kept = [n for n in names if not _MMREPARAM_NAME.match(n)]
    if kept:
        cfg.custom_imports = dict(imports, imports=kept)
    else:
        cfg.pop('custom_imports')


def upstream_deploy(cfg: Config, folded: Any) -> UpstreamDeploy:
    """The upstream deploy pair of a folded model: a config and a state_dict that build
    and load into the upstream toolbox's classes, with no mmreparam type, computing what
    the folded model computes.

    Each part of ``cfg.model`` of an mmreparam type is rewritten by its entry of
    :data:`UPSTREAM_CONVERTERS` (``mmreparam.ResNet`` -> the config toolbox's ResNet
    family, ``mmreparam.RepVGG`` -> mmpretrain's ``RepVGG(deploy=True)``,
    ``mmreparam.Reparameterized`` -> its ``module``); ``mmreparam.SyncBN`` becomes
    ``BN``; other re-parameterizable upstream parts get ``deploy=True`` as in
    :func:`~mmreparam.apis.deploy_config`. A part's weights are those under its config
    path (``backbone.`` for ``cfg.model.backbone``).

    Args:
        cfg (Config): The training config.
        folded (nn.Module | dict): The folded model, or its state_dict.

    Returns:
        UpstreamDeploy: The config, the state_dict and what was rewritten.

    Raises:
        NoUpstreamForm: Some part has no upstream class computing the same function (an
            mmreparam type without a converter, an argument the upstream class lacks, an
            SE RepVGG, ...), or the upstream model does not load the state strictly; the
            message says which part and why.
    """
    if not isinstance(cfg.get('model'), dict):
        raise NoUpstreamForm('the config has no model dict')
    state = folded.state_dict() if isinstance(folded, nn.Module) else folded
    state = {k: v.detach().cpu() for k, v in state.items()}
    ctx = _Context(scope=_toolbox_of(cfg))
    parts: List[str] = []
    new_state = dict(state)

    def visit(node: dict, path: str) -> Optional[dict]:
        type_name = node['type']
        if not is_mmreparam_type(type_name):
            return None
        key = _type_key(type_name)
        if key in RENAMED_TYPES:
            return dict(node, type=RENAMED_TYPES[key])
        what = path or 'model'
        converter = UPSTREAM_CONVERTERS.get(key)
        if converter is None:
            raise NoUpstreamForm(f'{what}: mmreparam.{key} has no upstream class')
        prefix = f'{path}.' if path else ''
        part_state = _sub_state(state, prefix)
        if not part_state:
            raise NoUpstreamForm(f'{what}: the folded model has no weights under {prefix!r}')
        up_node, up_state, up_type = converter(dict(node), part_state, ctx, what)
        for k in part_state:
            new_state.pop(prefix + k)
        new_state.update({prefix + k: v for k, v in up_state.items()})
        up_type = up_type if '.' in up_type or not ctx.scope else f'{ctx.scope}.{up_type}'
        parts.append(f'{what}: mmreparam.{key} -> {up_type}')
        # a converted node may hold other mmreparam names (norm_cfg=mmreparam.SyncBN)
        return _walk(up_node, path, visit)

    with DefaultScope.overwrite_default_scope(ctx.scope):
        model = _walk(copy.deepcopy(cfg.model), '', visit)
    dcfg = copy.deepcopy(cfg)
    dcfg.model = model
    deploy_parts = _set_deploy(dcfg.model, models_registry(ctx.scope))
    if not parts and not deploy_parts:
        raise NoUpstreamForm('no part of cfg.model is re-parameterizable: nothing to fold')
    deploy_cleanup(dcfg)
    _without_mmreparam_imports(dcfg)
    parts += [f'{key}: dropped (a config variable naming mmreparam)'
              for key in _without_mmreparam_variables(dcfg)]
    left = _mmreparam_values(dcfg._cfg_dict)
    if left:
        raise NoUpstreamForm(f'the config still names mmreparam at {", ".join(left[:3])}')
    try:
        built = _build(ctx.scope, dcfg.model)
        built.load_state_dict(new_state, strict=True)
    except NoUpstreamForm:
        raise
    except Exception as err:
        raise NoUpstreamForm(f'the upstream model of the config does not load the folded '
                             f'weights ({type(err).__name__}: {str(err).splitlines()[0]})'
                             ) from err
    return UpstreamDeploy(config=dcfg, state_dict=new_state, parts=parts)


__all__ = ['UpstreamDeploy', 'upstream_deploy', 'UPSTREAM_CONVERTERS', 'RENAMED_TYPES',
           'is_mmreparam_type', 'NoUpstreamForm']
