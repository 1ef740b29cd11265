"""Folding a module tree: mmreparam's blocks fold themselves, other libraries' modules are
asked to fold with their own methods.

:func:`fold_module` walks a model top-down. A module that follows the
:class:`~.base.Foldable` protocol (every mmreparam block) folds itself. mmpretrain, mmyolo
and timm fold their blocks with methods of their own, under a handful of names:
:data:`FOREIGN_FOLDS` lists them, in the order they are looked for, and
:func:`foreign_deploy_state` reads the markers by which their modules say that they are in
deploy form (built that way or already folded), so that the walk does not call a method
again on a module it has folded (many are not idempotent) and leaves a deploy-form model as
it is. A module without any marker is folded each time it is met. A foreign method that
raises leaves its module as it was (:class:`FoldFailure`).

Surveyed: mmpretrain 1.2.0 (RepVGG, MobileOne, RepLKNet, RepMLPNet, RIFormer, LeViT,
TinyViT), timm 1.0.31 (byobnet RepVGG / MobileOne, FastViT, GhostNetV3, RepGhostNet,
LCNetV2, NextViT, RepViT, LeViT, EfficientViT-MSRA, TinyViT, SHViT, iFormer, EfficientViM);
mmdet 3.3.0, mmseg 1.2.2 and mmcv 2.1.0 have none (mmdet's FPG neck has a ``fuse(fuse_dict)``
that is no fold: a method that needs arguments is never called). mmyolo (not installed here)
is known by its ``switch_to_deploy``. Model-level conveniences (timm's ``convert_to_deploy``)
are not called: walking the model folds the same modules.
"""
import contextlib
import copy
import inspect
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from ...errors import ForeignFoldError
from .base import Foldable


@dataclass(frozen=True)
class ForeignFold:
    """One foreign fold method.

    Attributes:
        method (str): The method's name; it is called without arguments.
        replaces (bool): The method returns the module that takes the caller's place in its
            parent (timm's ``fuse()``, as ``timm.utils.reparameterize_model`` uses it; a
            method that returns the module itself folded it in place). False: it folds the
            module in place and its return value is ignored.
        seen_in (str): Where it is found (documentation only).
    """
    method: str
    replaces: bool
    seen_in: str


#: The foreign fold methods, in the order they are looked for: a module is folded with the
#: first one it has. ``switch_to_deploy`` comes before ``reparameterize`` because
#: mmpretrain's RepVGGBlock / MobileOneBlock have both and their ``reparameterize()`` only
#: returns the fused kernel and bias.
FOREIGN_FOLDS: Tuple[ForeignFold, ...] = (
    ForeignFold('switch_to_deploy', False,
                'mmpretrain RepVGG / MobileOne / RIFormer blocks and backbones, LeViT '
                'backbone and head, RepLKNet and RepMLPNet backbones; mmyolo; '
                'timm GhostNetV3, RepGhost modules'),
    ForeignFold('reparameterize', False,
                'timm byobnet RepVggBlock / MobileOneBlock, FastViT (MobileOneBlock, '
                'ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc), LCNetV2, NextViT'),
    ForeignFold('merge_kernel', False, 'mmpretrain RepLKNet ReparamLargeKernelConv'),
    ForeignFold('local_inject', False, 'mmpretrain RepMLPNet RepMLPBlock'),
    ForeignFold('fuse', True,
                'timm RepViT, LeViT, EfficientViT-MSRA, TinyViT, SHViT, iFormer, EfficientViM '
                '(conv/linear + BN pairs, residual depthwise convs); mmpretrain LeViT and '
                'TinyViT conv/linear + BN pairs'),
)

#: Boolean attributes that say "in deploy form" when True: mmpretrain / mmyolo ``deploy``,
#: timm FastViT ``inference_mode``, GhostNetV3 ``infer_mode``, NextViT ``is_fused``,
#: EfficientViM ``fused``, mmpretrain ReparamLargeKernelConv ``small_kernel_merged``.
DEPLOY_FLAGS = ('deploy', 'inference_mode', 'infer_mode', 'is_fused', 'fused',
                'small_kernel_merged')


def _reparam_conv(module: nn.Module) -> Optional[bool]:
    # timm byobnet / FastViT: ``reparam_conv`` is None until folded (FastViT's RepMixer and
    # ReparamLargeKernelConv set no flag when they fold: this is their only marker).
    if 'reparam_conv' in module._modules or 'reparam_conv' in vars(module):
        return getattr(module, 'reparam_conv') is not None
    return None


def _lcnetv2_branches(module: nn.Module) -> Optional[bool]:
    # timm LCNetV2 RepDepthwiseSeparable: its branch list becomes None when folded.
    if 'dw_conv_list' in module._modules or 'dw_conv_list' in vars(module):
        return getattr(module, 'dw_conv_list') is None
    return None


def _repghost_fusion(module: nn.Module) -> Optional[bool]:
    # timm RepGhostModule: its fusion_conv / fusion_bn lists are emptied when folded.
    lists = [module._modules.get(name) for name in ('fusion_conv', 'fusion_bn')]
    if all(isinstance(item, (nn.ModuleList, nn.Sequential)) for item in lists):
        return all(len(item) == 0 for item in lists)
    return None


#: Markers other than :data:`DEPLOY_FLAGS`: each returns True (deploy form), False (train
#: form) or None (the module does not have this marker).
DEPLOY_MARKERS: Tuple[Callable[[nn.Module], Optional[bool]], ...] = (
    _reparam_conv, _lcnetv2_branches, _repghost_fusion)


def foreign_deploy_state(module: nn.Module) -> Optional[bool]:
    """Whether a foreign module is in deploy form, by its own markers.

    Args:
        module (nn.Module): A module of another library.

    Returns:
        bool or None: True when one of its markers says it is folded (or built in deploy
        form), False when it has markers and none says so, None when it has no marker.
    """
    states = [value for name, value in vars(module).items()
              if name in DEPLOY_FLAGS and isinstance(value, bool)]
    states += [state for state in (marker(module) for marker in DEPLOY_MARKERS)
               if state is not None]
    if not states:
        return None
    return any(states)


def _callable_without_arguments(fn) -> bool:
    """Whether ``fn`` is a bound method that can be called with no argument."""
    if not inspect.ismethod(fn):
        return False
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters)


def foreign_fold_of(module: nn.Module) -> Optional[ForeignFold]:
    """The entry of :data:`FOREIGN_FOLDS` that folds ``module``: the first method it has
    as a bound method callable without arguments (a submodule or attribute of the same
    name does not count); None when it has none."""
    for entry in FOREIGN_FOLDS:
        if _callable_without_arguments(getattr(module, entry.method, None)):
            return entry
    return None


def foreign_fold_problem(module: nn.Module) -> Optional[str]:
    """Why folding ``module`` with its own library's method would change its function; None
    when nothing is known against it.

    Known: mmpretrain (1.2.0)'s ``RepVGGBlock`` with an SE layer. Its deploy-mode forward
    returns ``branch_reparam(x)`` before the SE layer, so ``switch_to_deploy()`` drops the SE
    from the function (measured: relative error about 30 on a D2se block).
    """
    cls = type(module)
    if cls.__module__.startswith('mmpretrain.') and cls.__name__ == 'RepVGGBlock' \
            and getattr(module, 'se_cfg', None) is not None and not module.deploy:
        return (f'{cls.__module__}.RepVGGBlock with se_cfg cannot be folded: its deploy form '
                'skips the SE layer (mmpretrain returns branch_reparam(x) before it), so its '
                'outputs would change. Build mmreparam.RepVGG with the same arch and se_cfg '
                'instead: mmpretrain checkpoints load into it, and its fold keeps the SE')
    return None


def _ours(module: nn.Module) -> bool:
    """Whether the module's own class is defined in mmreparam: it is never folded through a
    foreign method name (a backbone's mmpretrain-style ``switch_to_deploy()`` only folds the
    :class:`~.base.Foldable` modules in it, which the walk folds itself). Asked of where the
    class is defined, which no base class says."""
    return type(module).__module__.startswith('mmreparam.')


@dataclass(frozen=True)
class FoldFailure:
    """A module that was left unfolded because its own fold method raised (or returned
    something that is not a module).

    Attributes:
        path (str): The module's name in the folded model (``''``: the model itself).
        cls (str): Its class, with the module it is defined in.
        method (str): The fold method that was called.
        error (str): What went wrong (the foreign exception's type and message).
    """
    path: str
    cls: str
    method: str
    error: str

    def __str__(self) -> str:
        return f'{self.path or "(model)"}: {self.cls}.{self.method}() {self.error}'


def describe_failures(failures: List[FoldFailure]) -> str:
    """One line for a list of :class:`FoldFailure`: grouped by class, method and error,
    each with the paths of its modules."""
    groups: Dict[Tuple[str, str, str], List[str]] = {}
    for failure in failures:
        key = (failure.cls, failure.method, failure.error)
        groups.setdefault(key, []).append(failure.path or '(model)')
    return '; '.join(f'{cls}.{method}() {error}, at {len(paths)} module(s): '
                     f'{", ".join(paths)}' for (cls, method, error), paths in groups.items())


@contextlib.contextmanager
def _factory_defaults_of(module: nn.Module) -> Iterator[None]:
    """Make new tensors default to the dtype and device of ``module``'s first floating
    tensor while a foreign fold method runs: many build their conv with ``nn.Conv2d(...)``
    and copy the fused kernel into it, which would otherwise give a float32 CPU conv in a
    float64 or CUDA model."""
    tensor = next((t for t in itertools.chain(module.parameters(), module.buffers())
                   if t.is_floating_point()), None)
    if tensor is None:
        yield
        return
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(tensor.dtype)
    except (TypeError, RuntimeError):  # a dtype torch does not take as default
        pass
    try:
        with torch.device(tensor.device):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _holds_foldables(module: nn.Module) -> bool:
    """Whether something inside ``module`` (not itself) can be folded."""
    return any(m is not module
               and (isinstance(m, Foldable) or (not _ours(m) and foreign_fold_of(m)))
               for m in module.modules())


def _should_call(module: nn.Module, entry: ForeignFold) -> bool:
    """Whether ``module``'s fold method is to be called.

    Not when its markers say it is in deploy form. Not when it has no marker, folds in
    place and holds foldable modules: such a container method (mmpretrain RepMLPNet's
    ``switch_to_deploy()``) only calls its modules' methods, without checking whether they
    are folded; the walk folds them, each once.
    """
    state = foreign_deploy_state(module)
    if state is True:
        return False
    return not (state is None and not entry.replaces and _holds_foldables(module))


def _restore(module: nn.Module, backup: Optional[nn.Module]) -> None:
    """Give ``module`` back the state of ``backup`` (its copy from before a failed fold)."""
    if backup is not None:
        module.__dict__.clear()
        module.__dict__.update(backup.__dict__)


def _call_foreign(module: nn.Module, entry: ForeignFold, path: str,
                  failures: Optional[List[FoldFailure]]) -> Tuple[nn.Module, int]:
    """Call ``module``'s fold method; return the module that takes its place and 1 when it
    was folded (0 when the call changed nothing it marks, or failed).

    A failure leaves the module as it was before the call and is appended to ``failures``
    (raised as :class:`~mmreparam.errors.ForeignFoldError` when ``failures`` is None).
    """
    cls = type(module)
    try:
        backup = copy.deepcopy(module)
    except Exception:  # noqa: BLE001 (a module that cannot be copied is not restored)
        backup = None
    error, cause = None, None
    try:
        with _factory_defaults_of(module):
            result = getattr(module, entry.method)()
    except Exception as err:  # noqa: BLE001 (any foreign error is reported, with its path)
        error, cause = f'raised {type(err).__name__}: {err}', err
    else:
        if not entry.replaces or result is None:
            result = module
        elif not isinstance(result, nn.Module):
            error = f'returned a {type(result).__name__}, not a module'
    if error is None:
        if result is not module:
            return result, 1
        return module, int(foreign_deploy_state(module) is not False)
    _restore(module, backup)
    failure = FoldFailure(path, f'{cls.__module__}.{cls.__qualname__}', entry.method, error)
    if failures is None:
        raise ForeignFoldError(f'could not fold {failure}') from cause
    failures.append(failure)
    return module, 0


def fold_module(module: nn.Module, path: str = '',
                failures: Optional[List[FoldFailure]] = None) -> Tuple[nn.Module, int]:
    """Fold ``module`` and everything in it, top-down.

    An mmreparam module that follows the :class:`Foldable` protocol (every
    :class:`~.base.ReparamBlock`, :class:`~mmreparam.models.layers.RepMLPBlock`) folds itself (its
    branches go away with it). Another library's module with a fold method of
    :data:`FOREIGN_FOLDS` is asked to fold itself, unless its markers say it is
    already in deploy form (:func:`foreign_deploy_state`); a ``fuse()``-style
    method gives the module that takes its place. The children are walked after that, since
    a foreign container may hold blocks it does not know.

    Args:
        module (nn.Module): The module (changed in place).
        path (str): Its name in the model, for messages. Defaults to ''.
        failures (list, optional): Collects a :class:`FoldFailure` for each foreign method
            that raised (the module is left as it was). None raises
            :class:`~mmreparam.errors.ForeignFoldError` at the first one instead.

    Returns:
        tuple[nn.Module, int]: The folded module (another one when a ``fuse()``-style method
        replaced it) and how many modules were folded.
    """
    if isinstance(module, Foldable):
        already = module.folded
        module.fold()
        return module, 0 if already else 1
    count = 0
    entry = None if _ours(module) else foreign_fold_of(module)
    if entry is not None and _should_call(module, entry):
        result, count = _call_foreign(module, entry, path, failures)
        if result is not module:  # its children are the replacement's
            return result, count + fold_children(result, path, failures)
    return module, count + fold_children(module, path, failures)


def fold_children(module: nn.Module, path: str = '',
                  failures: Optional[List[FoldFailure]] = None) -> int:
    """:func:`fold_module` on each child of ``module``, putting replacements in place;
    return how many modules were folded."""
    count = 0
    for name, child in list(module.named_children()):
        folded, done = fold_module(child, f'{path}.{name}' if path else name, failures)
        if folded is not child:
            setattr(module, name, folded)
        count += done
    return count


def fold_tree(module: nn.Module, failures: Optional[List[FoldFailure]] = None) -> int:
    """Fold everything in ``module`` in place; return how many modules were folded.

    Like :func:`fold_module`, except that the module itself keeps its place: a ``fuse()``
    that would replace it is not called, its children are folded.
    """
    entry = None if _ours(module) or isinstance(module, Foldable) else foreign_fold_of(module)
    if entry is not None and entry.replaces:
        return fold_children(module, '', failures)
    return fold_module(module, '', failures)[1]


__all__ = ['DEPLOY_FLAGS', 'DEPLOY_MARKERS', 'FOREIGN_FOLDS', 'FoldFailure', 'ForeignFold',
           'describe_failures', 'fold_children', 'fold_module', 'fold_tree',
           'foreign_deploy_state', 'foreign_fold_of', 'foreign_fold_problem']
