"""Batched kernel generation: the same values and gradients as per layer, far fewer ops."""
import copy
import logging

import pytest
import torch

from mmreparam.models.backbones import RepVGG, ResNet
from mmreparam.models.layers import OREPA, OREPA1x1
from mmreparam.models.layers import orepa_function as fn
from mmreparam.models.layers.orepa import (
    BATCHED_GENERATORS,
    batched_kernel_generation,
    generator_batches,
)
from mmreparam.testing import count_device_ops, randomize_bn, randomize_parameters

F64 = torch.float64
PASSES = [fn.TorchPasses, fn.passes_for(torch.zeros(1, dtype=F64))]  # + the extension when built


def stages(model, x):
    x = model.forward_stem(x)
    outs = []
    for stage in model.stage_modules():
        x = stage(x)
        outs.append(x)
    return outs


def outputs_and_grads(model, x, batched):
    model.zero_grad(set_to_none=True)
    if batched:
        with batched_kernel_generation(model, {}, cpu=True) as applied:
            assert applied
            outs = stages(model, x)
    else:
        outs = stages(model, x)
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
        for o in outs).backward()
    return outs, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


MODELS = dict(
    resnet50=lambda: ResNet(50, reparam='OREPA', base_channels=8, norm_eval=False),
    resnext=lambda: ResNet(50, reparam='OREPA', base_channels=16, groups=8, base_width=8,
                           norm_eval=False),
    resnet18_frozen=lambda: ResNet(18, reparam='OREPA', base_channels=8, frozen_stages=1),
    orepa_vgg=lambda: RepVGG('A0', reparam='OREPA_VGG', base_channels=8, norm_eval=False),
)


@pytest.mark.parametrize('dtype, tol', [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('name', list(MODELS))
def test_batched_equals_per_layer(name, dtype, tol):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    randomize_parameters(model, ('vector', 'idconv1', 'l2i_conv1', 'l2i_conv2'), seed=1)
    randomize_bn(model, seed=2)
    batches = generator_batches(model)
    assert max(len(b) for b in batches.values()) > 1, 'nothing is batched'
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    other = copy.deepcopy(model)
    ref_out, ref_grads = outputs_and_grads(model, x, batched=False)
    out, grads = outputs_and_grads(other, x, batched=True)
    for a, b in zip(ref_out, out):
        assert (a - b).abs().max() <= tol * a.abs().max()
    assert ref_grads.keys() == grads.keys()
    for key, ref in ref_grads.items():
        assert grads[key] is not None, key
        assert grads[key].is_contiguous(), key  # taken by autograd without a copy
        assert (ref - grads[key]).abs().max() <= tol * ref.abs().max().clamp_min(1e-30), key
    # Frozen parameters get no gradient through the batch either.
    frozen = [p for p in other.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    # Nothing is left behind: the kernels are dropped on exit.
    assert all(m._batched_kernel is None for m in other.modules()
               if isinstance(m, BATCHED_GENERATORS))


def kxk_generators(count, in_ch, out_ch, groups, with_conv1x1):
    gens = [OREPA(in_ch, out_ch, 3, groups=groups, with_conv1x1=with_conv1x1).double()
            for _ in range(count)]
    for i, g in enumerate(gens):
        randomize_parameters(g, ('vector', 'idconv1'), seed=i)
    return gens


@pytest.mark.parametrize('passes', PASSES)
@pytest.mark.parametrize('groups, with_conv1x1', [(1, True), (2, False)])
def test_kxk_batch_function_gradcheck(passes, groups, with_conv1x1):
    gens = kxk_generators(2, 4, 4, groups, with_conv1x1)
    first = gens[0]
    pattern, identity = first._batch_constants(2)
    names = first.branch_names
    coef = ['avg', 'prior'] + (['conv1x1'] if with_conv1x1 else [])
    layout = fn.KxkBatchLayout(2, groups, len(coef), names.index('origin'),
                            tuple(names.index(n) for n in coef), names.index('conv1x1_kxk'),
                            names.index('dw_pw'), passes)
    attrs = ['weight_orepa_origin', 'weight_orepa_avg_conv', 'weight_orepa_pfir_conv'] + \
        (['weight_orepa_1x1'] if with_conv1x1 else []) + \
        ['weight_orepa_1x1_kxk_idconv1', 'weight_orepa_1x1_kxk_conv2', 'weight_orepa_gconv_dw',
         'weight_orepa_gconv_pw', 'vector']
    params = [getattr(g, a).detach().clone().requires_grad_() for a in attrs for g in gens]
    assert torch.autograd.gradcheck(
        lambda *p: fn.OREPABatchKernelFunction.apply(layout, pattern, identity, *p), params)
    kernels = fn.OREPABatchKernelFunction.apply(layout, pattern, identity, *params).split(4)
    for g, k in zip(gens, kernels):
        torch.testing.assert_close(k, g.generate_kernel(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize('passes', PASSES)
@pytest.mark.parametrize('in_ch, out_ch', [(3, 5), (5, 3)])
def test_1x1_batch_function_gradcheck(passes, in_ch, out_ch):
    blocks = [OREPA1x1(in_ch, out_ch).double() for _ in range(3)]
    for i, b in enumerate(blocks):
        randomize_parameters(b, ('vector', 'l2i_conv1', 'l2i_conv2'), seed=i)
    attrs = ('weight_or1x1_origin', 'weight_or1x1_l2i_conv2', 'weight_or1x1_l2i_conv1',
             'vector')
    params = [getattr(b, a).detach().clone().requires_grad_() for a in attrs for b in blocks]
    assert torch.autograd.gradcheck(
        lambda *p: fn.OREPA1x1BatchKernelFunction.apply(passes, *p), params)
    kernels = fn.OREPA1x1BatchKernelFunction.apply(passes, *params)
    for b, k in zip(blocks, kernels):
        torch.testing.assert_close(k.reshape(out_ch, in_ch, 1, 1), b.generate_kernel(),
                                   rtol=1e-13, atol=1e-13)


def test_a_kernel_is_given_only_inside_the_block_even_after_an_error():
    model = ResNet(18, reparam='OREPA', base_channels=8)
    with pytest.raises(RuntimeError, match='injected'):
        with batched_kernel_generation(model, cpu=True):
            assert all(m._batched_kernel is not None for m in model.modules()
                       if isinstance(m, BATCHED_GENERATORS) and m.batch_key() is not None)
            raise RuntimeError('injected')
    assert all(m._batched_kernel is None for m in model.modules()
               if isinstance(m, BATCHED_GENERATORS))


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_where_batching_does_not_apply_it_says_so_once():
    from mmengine.logging import MMLogger

    from mmreparam.models.layers import orepa
    orepa._logged_reasons.clear()
    logger = MMLogger.get_current_instance()
    lines = _Lines()
    logger.addHandler(lines)
    model = ResNet(18, reparam='OREPA', base_channels=8)
    for _ in range(2):
        with batched_kernel_generation(model) as applied:
            assert not applied  # CPU: per layer with the compiled passes
    with_cp = ResNet(18, reparam='OREPA', base_channels=8, with_cp=True).to('meta')
    for _ in range(2):
        with batched_kernel_generation(with_cp) as applied:
            assert not applied
    logger.removeHandler(lines)
    out = '\n'.join(lines.lines)
    assert out.count('generated on the CPU, per layer') == 1, out
    assert out.count('per layer under with_cp') == 1, out
    with torch.no_grad(), batched_kernel_generation(with_cp) as applied:
        assert applied  # no recomputation without gradients
    folded = ResNet(18, reparam='OREPA', base_channels=8, deploy=True).to('meta')
    with batched_kernel_generation(folded) as applied:
        assert not applied and not generator_batches(folded)


def step_ops(reparam):
    model = torch.nn.Sequential(
        ResNet(50, reparam=reparam, out_indices=(3, ), norm_eval=False)).to('meta').train()
    x = torch.randn(2, 3, 64, 64, device='meta')

    def step():
        model.zero_grad(set_to_none=True)
        model(x)[0].sum().backward()

    step()
    return count_device_ops(step)['ops']


def test_orepa_adds_few_device_ops_over_base():
    """The CPU-checkable proxy for GPU launch overhead: operators dispatched by one
    training step of ResNet-50 on meta tensors (2026-12-01: base 458; OREPA adds 524 with
    batched generation, 1,599 per layer; DBB adds 960)."""
    base, orepa, dbb = step_ops('base'), step_ops('OREPA'), step_ops('DBB')
    assert orepa - base <= 600, (base, orepa)
    assert orepa - base < dbb - base, (orepa, dbb)


def twin_backbones(**kwargs):
    torch.manual_seed(0)
    per_layer = ResNet(18, reparam='OREPA', base_channels=8, norm_eval=False, **kwargs)
    randomize_parameters(per_layer, ('vector', 'idconv1', 'l2i_conv1', 'l2i_conv2'), seed=1)
    per_layer.batched_generation = False
    batched = copy.deepcopy(per_layer)
    batched.batched_generation = True
    return per_layer.train(), batched.train()


def assert_same_grads(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert (p.grad - q.grad).abs().max() <= tol * p.grad.abs().max().clamp_min(1e-30), name


@pytest.fixture
def batch_sizes(monkeypatch):
    """The sizes of the batches generated (a spy on the kxk generators' batch function)."""
    from mmreparam.models.layers import orepa
    sizes = []
    original = orepa.OREPAGeneratorMixin.generate_batch

    def spy(generators, constants=None):
        sizes.append(len(generators))
        return original(generators, constants)

    monkeypatch.setattr(orepa.OREPAGeneratorMixin, 'generate_batch', staticmethod(spy))
    return sizes


def test_batched_backbone_under_autocast_and_gradient_accumulation(batch_sizes):
    per_layer, batched = twin_backbones()
    x = torch.randn(2, 3, 32, 32)
    for model in (per_layer, batched):
        for _ in range(2):  # two micro-batches, one optimizer step
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = model(x)
            assert out[0].dtype == torch.bfloat16
            sum(o.float().square().mean() for o in out).backward()
        assert (max(batch_sizes) > 1) == (model is batched)
    assert_same_grads(per_layer, batched, 1e-3)


def test_batched_backbone_with_cp_falls_back_and_stays_exact(batch_sizes):
    per_layer, batched = twin_backbones(with_cp=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    for model in (per_layer, batched):
        sum(o.square().mean() for o in model(x)).backward()
    assert_same_grads(per_layer, batched, 1e-5)
    assert max(batch_sizes) == 1  # per layer


def test_batched_backbone_in_ema_and_ddp(batch_sizes):
    import os

    import torch.distributed as dist
    from mmengine.model import ExponentialMovingAverage
    from torch.nn.parallel import DistributedDataParallel

    per_layer, batched = twin_backbones(frozen_stages=1)
    ema = ExponentialMovingAverage(batched, momentum=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(per_layer.eval()(x), ema.module.eval()(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    per_layer.train()
    os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
    os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(batched, find_unused_parameters=False)
        for _ in range(2):  # the second step fails if a parameter missed the reduction
            for model in (per_layer, ddp):
                model.zero_grad(set_to_none=True)
                sum(o.square().mean() for o in model(x)).backward()
        assert_same_grads(per_layer, batched, 1e-5)
        assert max(batch_sizes) > 1
    finally:
        dist.destroy_process_group()


def test_batched_generation_value_is_checked():
    model = ResNet(18, reparam='OREPA', base_channels=8)
    model.batched_generation = 'yes'
    with pytest.raises(ValueError, match="batched_generation must be 'auto', True or False"):
        model(torch.randn(1, 3, 32, 32))
