"""Helpers for checking folds: give a model non-trivial BatchNorm statistics and scales.

A freshly built BatchNorm has mean 0, variance 1, weight 1 and bias 0, so it folds to a
zero bias and an unscaled kernel and proves nothing about the fold. These helpers make
every BatchNorm (and every learned branch scale) random, as after training.
"""
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


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
