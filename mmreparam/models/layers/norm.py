"""A synchronized BatchNorm that works on any device and process-group backend (gloo too).

``torch.nn.SyncBatchNorm`` (``type='SyncBN'``) refuses CPU tensors in training, so a CPU
multi-process run (gloo) cannot use it. :class:`SyncBatchNorm` computes the batch statistics
over all processes with two differentiable all-reduces (sum and count, then the sum of
squared deviations from the global mean: exact, no ``E[x^2] - E[x]^2`` cancellation), and
behaves as a plain BatchNorm in eval mode or outside a process group of more than one
process. Being a ``_BatchNorm``, it folds like any BN.
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ...registry import MODELS


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the processes of a group: the gradient is summed too."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce(tensor: Tensor, group=None) -> Tensor:
    """Sum of ``tensor`` over the processes of ``group``, differentiable."""
    return _AllReduceSum.apply(tensor, group)


@MODELS.register_module('SyncBN')
class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are computed over all processes of a group.

    Use it as ``norm_cfg=dict(type='mmreparam.SyncBN')``. On GPUs with NCCL, torch's own
    ``type='SyncBN'`` is faster; this one also runs on CPU with gloo.

    Args:
        num_features (int): Channels (dimension 1 of the input).
        eps (float): Added to the variance. Defaults to 1e-5.
        momentum (float, optional): Running-statistics momentum; None for a cumulative
            average. Defaults to 0.1.
        affine (bool): Learnable weight and bias. Defaults to True.
        track_running_stats (bool): Keep running statistics. Defaults to True.
        process_group (ProcessGroup, optional): The group to synchronize over; None for the
            default group. Defaults to None.
    """
    _abbr_ = 'bn'

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor):
        if input.dim() < 2:
            raise ValueError(f'SyncBatchNorm expects an input of at least 2 dimensions '
                             f'(N, C, ...), got {input.dim()}')

    def _synchronized(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize with statistics over all processes (training), else as a BatchNorm."""
        if not self._synchronized():
            return super().forward(input)  # checks the input itself
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f'SyncBatchNorm({self.num_features}) got {input.shape[1]} '
                             'channels')
        group = self.process_group or dist.group.WORLD
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        # Statistics in at least float32: a float16 sum or count overflows (65504) and a
        # bfloat16 one rounds; the output returns in the input's dtype, as torch's BNs do.
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = x.new_full((1, ), input.numel() // input.shape[1])
        totals = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        total_count = totals[-1].detach()
        if total_count < 2:
            raise ValueError('SyncBatchNorm needs more than one value per channel over all '
                             f'processes in training, got input of shape {tuple(input.shape)}')
        mean = totals[:-1] / total_count
        centred = x - mean.reshape(shape)
        var = all_reduce(centred.square().sum(dims), group=group) / total_count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total_count)
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor):
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else
                    self.momentum)
        unbiased = var * (count / (count - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
