"""Helpers for checking folds: give a model non-trivial BatchNorm statistics and scales.

A freshly built BatchNorm has mean 0, variance 1, weight 1 and bias 0, so it folds to a
zero bias and an unscaled kernel and proves nothing about the fold. These helpers make
every BatchNorm (and every learned branch scale) random, as after training.
"""
import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .models.layers.orepa import orepa_kernel_reference

#: The paper-readable OREPA kernel, the reference the generators are checked against (its
#: name in tests and tools).
literal_orepa_kernel = orepa_kernel_reference


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set random running statistics and affine parameters on every BatchNorm of ``model``.

    Args:
        model (nn.Module): Changed in place.
        seed (int): Seed of the private generator used. Defaults to 0.

    Returns:
        nn.Module: ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t, low, high):
        return (torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low) + low
                ).to(t)

    for module in model.modules():
        if isinstance(module, _BatchNorm):
            if module.running_mean is not None:
                module.running_mean.copy_(rand(module.running_mean, -0.5, 0.5))
                module.running_var.copy_(rand(module.running_var, 0.5, 2.0))
            if module.affine:
                module.weight.copy_(rand(module.weight, 0.5, 1.5))
                module.bias.copy_(rand(module.bias, -0.5, 0.5))
    return model


@torch.no_grad()
def randomize_parameters(model: nn.Module, names, seed: int = 0, scale: float = 0.5
                         ) -> nn.Module:
    """Overwrite the parameters whose name ends with one of ``names`` with random values.

    Used for parameters that start at zero or a constant (OREPA's branch ``vector``,
    identity offsets), so that every branch contributes to the checked function.
    """
    gen = torch.Generator().manual_seed(seed)
    names = tuple(names)
    for name, param in model.named_parameters():
        if name.endswith(names):
            param.copy_((torch.randn(param.shape, generator=gen, dtype=torch.float64)
                         * scale).to(param))
    return model


def randomized_block(block_type, cfg: dict, seed: int = 0) -> nn.Module:
    """A block to check a fold with: ``block_type(**cfg)`` in float64 with every parameter
    random (zero- and constant-initialised branch scales included, so that every branch
    contributes) and random BatchNorm statistics, in eval mode.

    Args:
        block_type (type): A block class, e.g. :class:`~mmreparam.models.layers.OREPA`.
        cfg (dict): Its constructor arguments.
        seed (int): Seed of the weights. Defaults to 0.

    Returns:
        nn.Module: The block.
    """
    torch.manual_seed(seed)
    module = block_type(**cfg).double()
    randomize_parameters(module, ('', ), seed=seed)
    randomize_bn(module, seed=seed + 1)
    return module.eval()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default dtype meanwhile (restored afterwards).

    Build a block or model inside it to check a fold in float64: buffers a block computes
    when it is built (OREPA's frequency prior) are then exact in float64, where
    ``model.double()`` after a float32 build only widens float32-rounded values.

    Args:
        dtype (torch.dtype): A floating dtype, e.g. ``torch.float64``.
    """
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def official_repopt_keys(state_dict: dict) -> dict:
    """A ``RepOptVGG`` state dict renamed to the official RepOptimizer layout (``stem.`` ->
    ``stage0.``, ``stage_i.`` -> ``stagei.``), to build official-format checkpoints in tests."""
    official = {}
    for key, value in state_dict.items():
        key = key.replace('stem.', 'stage0.', 1)
        for i in range(1, 5):
            key = key.replace(f'stage_{i}.', f'stage{i}.', 1)
        official[key] = value
    return official


def _is_view(func) -> bool:
    """Whether an ATen operator returns a view of an input (not a new tensor; in-place and
    ``out=`` operators write, so they count as work)."""
    return any(r.alias_info is not None and not r.alias_info.is_write
               for r in func._schema.returns)


def count_device_ops(fn) -> dict:
    """Count the ATen operators that ``fn()`` dispatches on non-CPU tensors.

    Run a model on the ``meta`` device (shapes only, no arithmetic) to count, on a machine
    without a GPU, the kernels that the same code launches on a GPU: each operator that
    writes a non-CPU tensor is one launch on CUDA (views are only metadata and counted
    apart). The backward pass is counted too (autograd runs it in the same mode).

    Args:
        fn (callable): What to count, e.g. one forward and backward pass.

    Returns:
        dict: ``ops`` (operators, views excluded), ``views`` and ``by_op``, the count of each
        operator name.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Counter(TorchDispatchMode):

        def __init__(self):
            super().__init__()
            self.ops, self.views, self.by_op = 0, 0, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = tree_flatten((args, kwargs, out))[0]
            if any(isinstance(t, torch.Tensor) and t.device.type != 'cpu' for t in tensors):
                if _is_view(func):
                    self.views += 1
                else:
                    self.ops += 1
                    self.by_op[str(func)] = self.by_op.get(str(func), 0) + 1
            return out

    counter = Counter()
    with counter:
        fn()
    return dict(ops=counter.ops, views=counter.views,
                by_op=dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1])))
