"""mmreparam.SyncBN: statistics over all processes, on CPU with gloo."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmreparam.models.layers import OREPA, SyncBatchNorm
from mmreparam.testing import randomize_bn

F64 = torch.float64


def _worker(rank, world, port, x, weights, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        norm = SyncBatchNorm(x.shape[1]).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        part = x.chunk(world)[rank].clone().requires_grad_()
        out = norm(part)
        (out * weights.chunk(world)[rank]).sum().backward()
        results[rank] = dict(out=out.detach(), grad=part.grad, weight_grad=norm.weight.grad,
                             bias_grad=norm.bias.grad, mean=norm.running_mean,
                             var=norm.running_var)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_batchnorm_over_the_whole_batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, 3, generator=gen, dtype=F64) * 3 + 2
    weights = torch.randn(x.shape, generator=gen, dtype=F64)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), x, weights, results), nprocs=2, join=True)

    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (out * weights).sum().backward()
    r0, r1 = results[0], results[1]
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r0['out'], r1['out']]), out.detach(), **close)
    torch.testing.assert_close(torch.cat([r0['grad'], r1['grad']]), xr.grad, **close)
    # Each rank holds its share of the parameter gradients (DDP then averages them).
    torch.testing.assert_close(r0['weight_grad'] + r1['weight_grad'], ref.weight.grad, **close)
    torch.testing.assert_close(r0['bias_grad'] + r1['bias_grad'], ref.bias.grad, **close)
    for r in (r0, r1):
        torch.testing.assert_close(r['mean'], ref.running_mean, **close)
        torch.testing.assert_close(r['var'], ref.running_var, **close)


def test_without_process_group_it_is_a_batchnorm():
    x = torch.randn(4, 3, 5, 5)
    norm, ref = SyncBatchNorm(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(norm(x), ref(x))
    torch.testing.assert_close(norm.running_var, ref.running_var)
    with pytest.raises(ValueError, match='at least 2 dimensions'):
        norm(torch.randn(3))


def test_blocks_take_it_and_fold():
    block = OREPA(4, 8, 3, norm_cfg=dict(type='mmreparam.SyncBN')).double()
    assert isinstance(block.bn, SyncBatchNorm)
    randomize_bn(block)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    block.eval()
    expected = block(x)
    block.fold()
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def _half_worker(rank, world, port, x, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        norm = SyncBatchNorm(x.shape[1])
        out = norm(x.chunk(world)[rank])
        results[rank] = dict(out=out.detach(), mean=norm.running_mean)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('dtype, tol', [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_inputs_keep_float32_statistics(dtype, tol):
    """45000 values per channel: a float16 sum (or count) would overflow, a bfloat16 one round."""
    x = (torch.rand(8, 2, 75, 75, generator=torch.Generator().manual_seed(0)) + 1).to(dtype)
    results = mp.Manager().dict()
    mp.spawn(_half_worker, args=(2, free_port(), x, results), nprocs=2, join=True)
    ref = torch.nn.BatchNorm2d(2)
    expected = ref(x.float())
    out = torch.cat([results[0]['out'], results[1]['out']])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol * 4)
    torch.testing.assert_close(results[0]['mean'], ref.running_mean, rtol=1e-5, atol=1e-6)
