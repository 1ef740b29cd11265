"""Folding under the modes users run in: bf16 autocast training, no_grad, inference_mode,
channels_last, and half-precision inputs after the fold."""
import copy

import pytest
import torch

import mmreparam
from mmreparam.models.backbones import ResNet
from mmreparam.testing import randomize_bn, randomize_parameters


def small_resnet(reparam='OREPA', randomize=True):
    torch.manual_seed(0)
    model = ResNet(18, reparam=reparam, base_channels=8, init_cfg=None)
    if randomize:
        randomize_parameters(model, ('vector', 'idconv1'), seed=1)
        randomize_bn(model, seed=2)
    return model


def max_rel(ref, out):
    return max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
               for a, b in zip(ref, out))


@pytest.mark.parametrize('reparam', ['OREPA', 'DBB'])
def test_bf16_autocast_training_then_exact_fp32_fold(reparam):
    model = small_resnet(reparam, randomize=False)  # as initialised for training
    model.init_weights()
    head = torch.nn.Linear(64, 10)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.train()
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(head(out[-1].mean((2, 3))), y)
        assert out[-1].dtype == torch.bfloat16
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters() if p.requires_grad)
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    randomize_bn(model, seed=3).eval()
    folded = mmreparam.fold(model)
    assert mmreparam.fold_error(model, folded, x)['max_rel'] < 1e-5


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_fold_and_run_under_no_grad_and_inference_mode(context):
    model = small_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with context():
        folded = mmreparam.fold(model)
        out = folded(x)
    assert max_rel(ref, out) < 1e-5
    # A model folded under inference_mode still trains (its tensors are normal tensors).
    folded.train()
    sum(o.sum() for o in folded(x)).backward()
    assert folded.stem.reparam_conv.weight.grad is not None


def test_channels_last_before_and_after_the_fold():
    model = small_resnet().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    folded = mmreparam.fold(model)
    assert mmreparam.fold_error(model, folded, x)['max_rel'] < 1e-5
    folded_cl = mmreparam.fold(small_resnet().eval()).to(memory_format=torch.channels_last)
    assert mmreparam.fold_error(model, folded_cl, x)['max_rel'] < 1e-5


def cpu_conv_supports(dtype):
    """torch 2.1 has no float16 convolution on the CPU ('slow_conv2d_cpu' not implemented
    for 'Half'); later versions have."""
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 3, 3, dtype=dtype),
                                   torch.zeros(1, 1, 1, 1, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_inputs_after_the_fold(dtype, tol):
    if not cpu_conv_supports(dtype):
        pytest.skip(f'this torch ({torch.__version__}) has no {dtype} convolution on the CPU')
    model = small_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    folded = mmreparam.fold(model)
    half = copy.deepcopy(folded).to(dtype)
    with torch.no_grad():
        ref = model(x)[-1]
        out = half(x.to(dtype))[-1]
    assert out.dtype == dtype
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, err
