"""The link between a re-param block put into another library's model and the conv -> BN
pair it replaced (:func:`mmreparam.reparameterize`).

The block takes the conv's place and a :class:`ReplacedNorm` (the identity, no state) the
BN's. The lowest module holding both keeps a :class:`PairRecord` per pair: the paths and
the original conv and BN as shape-only (``meta``) templates. With it

- a state_dict in the upstream layout (the pair's plain ``conv.weight`` and BN keys: an
  upstream checkpoint, loaded by ``load_state_dict``, ``init_cfg=Pretrained`` or
  ``load_from``) is expanded into the block's state on load (a load_state_dict pre-hook);
- :func:`restore_upstream` (called by :func:`mmreparam.fold`) puts the original classes
  back: the block's kernel in the conv and its bias in the conv's bias, or in the BN set to
  identity-plus-bias (mean 0, var ``1 - eps``, weight 1, bias ``b``), so that the folded
  model has the upstream state_dict keys and loads into the upstream class.
"""
import copy
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..models.layers.base import ReparamBlock
from ..models.layers.fuse import Affine

#: The attribute of the module holding a pair that lists its :class:`PairRecord` s.
PAIRS_ATTR = '_mmreparam_pairs'
#: The attribute with the id of that module's load_state_dict pre-hook.
HOOK_ATTR = '_mmreparam_pairs_hook'


class ReplacedNorm(nn.Module):
    """The place of a BatchNorm merged into the re-param block before it: the identity.

    Holds no state; :func:`restore_upstream` puts a BatchNorm of the original class back.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x``: the BN's function is part of the block before it."""
        return x


class PairRecord(NamedTuple):
    """A conv -> BN pair replaced by a block, relative to the module that holds both.

    Attributes:
        conv (str): Path of the block (the conv's place).
        norm (str): Path of the :class:`ReplacedNorm` (the BN's place).
        conv_template (nn.Module): The original conv, on the ``meta`` device.
        norm_template (nn.Module): The original BN, on the ``meta`` device.
    """
    conv: str
    norm: str
    conv_template: nn.Module
    norm_template: nn.Module


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (a conv or a BN) with its tensors on the ``meta`` device: its
    class and settings, no data."""
    memo = {}
    for param in module.parameters(recurse=False):
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device='meta'),
                                       requires_grad=param.requires_grad)
    for buffer in module.buffers(recurse=False):
        memo[id(buffer)] = torch.empty_like(buffer, device='meta')
    return copy.deepcopy(module, memo)


def _split(path: str):
    parent, _, name = path.rpartition('.')
    return parent, name


def _common_parent(a: str, b: str) -> str:
    parts = []
    for x, y in zip(a.split('.')[:-1], b.split('.')[:-1]):
        if x != y:
            break
        parts.append(x)
    return '.'.join(parts)


def _relative(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent else path


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (dotted) in ``root``."""
    parent, name = _split(path)
    setattr(root.get_submodule(parent) if parent else root, name, module)


def install_pair(root: nn.Module, conv_path: str, norm_path: str, block: ReparamBlock,
                 conv: nn.Module, norm: _BatchNorm) -> None:
    """Put ``block`` at ``conv_path`` and a :class:`ReplacedNorm` at ``norm_path`` of
    ``root``, and record the pair (``conv`` and ``norm`` are the originals) on the module
    holding both, with the load_state_dict pre-hook that expands upstream keys."""
    holder_path = _common_parent(conv_path, norm_path)
    holder = root.get_submodule(holder_path) if holder_path else root
    record = PairRecord(_relative(conv_path, holder_path), _relative(norm_path, holder_path),
                        meta_copy(conv), meta_copy(norm))
    replaced = ReplacedNorm()
    replaced.train(norm.training)
    set_submodule(root, conv_path, block)
    set_submodule(root, norm_path, replaced)
    records: Optional[List[PairRecord]] = getattr(holder, PAIRS_ATTR, None)
    if records is None:
        records = []
        object.__setattr__(holder, PAIRS_ATTR, records)
        handle = holder._register_load_state_dict_pre_hook(expand_upstream_state,
                                                            with_module=True)
        object.__setattr__(holder, HOOK_ATTR, handle.id)
    records.append(record)


def pair_records(module: nn.Module) -> List[PairRecord]:
    """The pairs recorded on ``module`` (empty if none)."""
    return list(getattr(module, PAIRS_ATTR, None) or ())


def _upstream_norm_keys(norm: _BatchNorm) -> List[str]:
    keys = ['running_mean', 'running_var']
    if norm.affine:
        keys += ['weight', 'bias']
    return keys


def expand_upstream_state(module: nn.Module, state_dict: Dict[str, Tensor], prefix: str,
                          *args) -> None:
    """load_state_dict pre-hook of a module holding replaced pairs: where ``state_dict``
    has a pair's upstream keys (``<conv>.weight``, ``<norm>.running_mean``, ...) instead of
    the block's, replace them by the block's expansion of that conv and BN.

    Keys that do not fit (another shape, a missing BN key) are left as they are, for the
    loader to report.
    """
    for record in pair_records(module):
        block = module.get_submodule(record.conv)
        if not isinstance(block, ReparamBlock):
            continue
        conv_prefix, norm_prefix = f'{prefix}{record.conv}.', f'{prefix}{record.norm}.'
        conv_keys = ['weight'] + (['bias'] if record.conv_template.bias is not None else [])
        norm_keys = _upstream_norm_keys(record.norm_template)
        found = [conv_prefix + k for k in conv_keys] + [norm_prefix + k for k in norm_keys]
        if not all(key in state_dict for key in found):
            continue
        kernel = state_dict[conv_prefix + 'weight']
        norm = {k: state_dict[norm_prefix + k] for k in norm_keys}
        mean = norm['running_mean']
        if record.conv_template.bias is not None:
            mean = mean - state_dict[conv_prefix + 'bias']
        ones = torch.ones_like(mean)
        affine = Affine(norm.get('bias', ones - 1), norm.get('weight', ones), mean,
                        norm['running_var'], record.norm_template.eps)
        try:
            state = block.expansion_state(kernel, affine)
        except (RuntimeError, ValueError):
            continue  # a shape mismatch: the loader reports the keys
        for key in found + [norm_prefix + 'num_batches_tracked']:
            state_dict.pop(key, None)
        state_dict.update({conv_prefix + key: value for key, value in state.items()})


def _upstream_modules(record: PairRecord, block: ReparamBlock):
    """The original conv and BN computing what ``block`` computes (eval mode)."""
    with torch.no_grad():
        kernel, affine = block.kernel_and_affine()
        kernel, bias = affine.fold_into(kernel)
        conv = copy.deepcopy(record.conv_template).to_empty(device=kernel.device)
        norm = copy.deepcopy(record.norm_template).to_empty(device=kernel.device)
        conv.to(kernel.dtype)
        norm.to(kernel.dtype)
        conv.weight.copy_(kernel)
        norm.running_mean.zero_()
        norm.running_var.fill_(1 - norm.eps)
        if norm.num_batches_tracked is not None:
            norm.num_batches_tracked.zero_()
        if norm.affine:
            norm.weight.fill_(1)
            norm.bias.zero_()
        if conv.bias is not None:
            conv.bias.copy_(bias)
        elif norm.affine:
            norm.bias.copy_(bias)
        else:  # no parameter for the bias: (x + b - 0) / 1 == (x - (-b)) / 1
            norm.running_mean.copy_(-bias)
    trainable = any(p.requires_grad for p in block.parameters())
    conv.requires_grad_(trainable)
    norm.requires_grad_(trainable)
    conv.train(block.training)
    norm.train(block.training)
    return conv, norm


def restore_upstream(model: nn.Module) -> int:
    """Put the original conv and BN back for every block :func:`mmreparam.reparameterize`
    put into ``model`` (in place), computing the block's eval-mode function; return how
    many pairs were restored.

    The block's kernel goes into the conv; its bias into the conv's bias when the conv has
    one, else into the BN, set to identity-plus-bias (running mean 0, running var
    ``1 - eps``, weight 1, bias ``b``). The result has the upstream classes and state_dict
    keys: ``fresh_upstream.load_state_dict(model.state_dict(), strict=True)`` computes the
    same function.
    """
    count = 0
    for holder in list(model.modules()):
        records = pair_records(holder)
        if not records:
            continue
        for record in records:
            block = holder.get_submodule(record.conv)
            if not isinstance(block, ReparamBlock):
                continue
            conv, norm = _upstream_modules(record, block)
            set_submodule(holder, record.conv, conv)
            set_submodule(holder, record.norm, norm)
            count += 1
        holder._load_state_dict_pre_hooks.pop(getattr(holder, HOOK_ATTR), None)
        object.__delattr__(holder, PAIRS_ATTR)
        object.__delattr__(holder, HOOK_ATTR)
    return count


__all__ = ['ReplacedNorm', 'PairRecord', 'install_pair', 'pair_records', 'restore_upstream',
           'expand_upstream_state']
