"""The fold math against explicit convolutions (float64, so any mistake is visible)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmreparam.models.layers import fuse
from mmreparam.testing import randomize_bn

D = dict(dtype=torch.float64)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_fuse_bn_matches_eval_bn():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True).double()
    bn = randomize_bn(nn.BatchNorm2d(6).double()).eval()
    x = rand(2, 4, 7, 7)
    kernel, bias = fuse.fuse_bn(conv.weight, bn, conv.bias)
    ref = bn(conv(x))
    assert torch.allclose(F.conv2d(x, kernel, bias, padding=1), ref, atol=1e-12)


def test_fuse_bn_without_affine_and_without_stats():
    bn = randomize_bn(nn.BatchNorm2d(3, affine=False).double()).eval()
    kernel = rand(3, 2, 1, 1)
    x = rand(2, 2, 5, 5)
    k, b = fuse.fuse_bn(kernel, bn)
    assert torch.allclose(F.conv2d(x, k, b), bn(F.conv2d(x, kernel)), atol=1e-12)
    with pytest.raises(ValueError, match='running statistics'):
        fuse.fuse_bn(kernel, nn.BatchNorm2d(3, track_running_stats=False))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_functions_follow_input_dtype(dtype):
    bn = nn.BatchNorm2d(4).to(dtype)
    k, b = fuse.fuse_bn(rand(4, 4, 3, 3, dtype=dtype), bn)
    assert k.dtype == b.dtype == dtype
    assert fuse.merge_1x1_kxk(rand(4, 4, 1, 1, dtype=dtype), None,
                              rand(4, 4, 3, 3, dtype=dtype), None)[0].dtype == dtype
    assert fuse.identity_kernel(4, 3, dtype=dtype).dtype == dtype


def test_pad_kernel_centres_and_rejects_bad_sizes():
    k1 = rand(2, 2, 1, 1)
    x = rand(1, 2, 6, 6)
    assert torch.allclose(F.conv2d(x, fuse.pad_kernel(k1, 5), padding=2), F.conv2d(x, k1))
    k13 = rand(2, 2, 1, 3)
    assert torch.allclose(F.conv2d(x, fuse.pad_kernel(k13, 3), padding=1),
                          F.conv2d(x, k13, padding=(0, 1)))
    with pytest.raises(ValueError):
        fuse.pad_kernel(rand(2, 2, 3, 3), 4)


@pytest.mark.parametrize('groups', [1, 2, 3])
def test_identity_and_avg_kernels(groups):
    x = rand(2, 6, 7, 7)
    ident = fuse.identity_kernel(6, 3, groups, **D)
    assert torch.equal(F.conv2d(x, ident, padding=1, groups=groups), x)
    avg = fuse.avg_kernel(6, 3, groups, **D)
    assert torch.allclose(F.conv2d(x, avg, padding=1, groups=groups),
                          F.avg_pool2d(x, 3, 1, 1), atol=1e-14)


@pytest.mark.parametrize('groups', [1, 2])
def test_merge_1x1_kxk_with_bias_padding(groups):
    x = rand(2, 4, 8, 8)
    k1, b1 = rand(6, 4 // groups, 1, 1, seed=1), rand(6, seed=2)
    k2, b2 = rand(5 * groups, 6 // groups, 3, 3, seed=3), rand(5 * groups, seed=4)
    mid = F.conv2d(x, k1, b1, groups=groups)
    # Padding with the 1x1's bias is what makes the merge exact at the borders.
    mid = F.pad(mid - b1.reshape(1, -1, 1, 1), [1] * 4) + b1.reshape(1, -1, 1, 1)
    ref = F.conv2d(mid, k2, b2, groups=groups)
    k, b = fuse.merge_1x1_kxk(k1, b1, k2, b2, groups)
    assert torch.allclose(F.conv2d(x, k, b, padding=1, groups=groups), ref, atol=1e-12)


def test_merge_1x1_depthwise():
    x = rand(2, 4, 8, 8)
    k1, b1 = rand(6, 2, 1, 1, seed=1), rand(6, seed=2)
    dw, bdw = rand(6, 1, 3, 3, seed=3), rand(6, seed=4)
    mid = F.conv2d(x, k1, b1, groups=2)
    mid = F.pad(mid - b1.reshape(1, -1, 1, 1), [1] * 4) + b1.reshape(1, -1, 1, 1)
    ref = F.conv2d(mid, dw, bdw, groups=6)
    k, b = fuse.merge_1x1_depthwise(k1, b1, dw, bdw)
    assert torch.allclose(F.conv2d(x, k, b, padding=1, groups=2), ref, atol=1e-12)


@pytest.mark.parametrize('groups,multiplier', [(1, 1), (1, 8), (2, 3)])
def test_dw_pw_to_full(groups, multiplier):
    x = rand(2, 4, 7, 7)
    dw = rand(4 * multiplier, 1, 3, 3, seed=1)
    pw = rand(6, 4 * multiplier // groups, 1, 1, seed=2)
    ref = F.conv2d(F.conv2d(x, dw, padding=1, groups=4), pw, groups=groups)
    full = fuse.dw_pw_to_full(dw, pw, 4, groups)
    assert full.shape == (6, 4 // groups, 3, 3)
    assert torch.allclose(F.conv2d(x, full, padding=1, groups=groups), ref, atol=1e-12)
    with pytest.raises(ValueError):
        fuse.dw_pw_to_full(dw, pw, 5, groups)


def test_compose_kernels_is_the_stacked_convolution():
    x = rand(2, 3, 12, 12)
    a, b, c = rand(5, 3, 3, 3, seed=1), rand(4, 5, 3, 3, seed=2), rand(2, 4, 5, 5, seed=3)
    ab = fuse.compose_kernels(a, b)
    assert ab.shape == (4, 3, 5, 5)
    # Without padding the stacked convolutions and the composed kernel agree everywhere.
    assert torch.allclose(F.conv2d(x, ab), F.conv2d(F.conv2d(x, a), b), atol=1e-12)
    abc = fuse.compose_kernels(ab, c)
    assert torch.allclose(F.conv2d(x, abc), F.conv2d(F.conv2d(F.conv2d(x, a), b), c),
                          atol=1e-11)


@pytest.mark.parametrize('k', [1, 3, 5, 7])
def test_frequency_prior_defined_for_every_size(k):
    prior = fuse.frequency_prior(6, k, **D)
    assert prior.shape == (6, k, k) and torch.isfinite(prior).all()
    # First half varies along rows only, second half along columns only.
    assert torch.allclose(prior[:3], prior[:3, :, :1].expand(-1, -1, k))
    assert torch.allclose(prior[3:], prior[3:, :1, :].expand(-1, k, -1))


def test_frequency_prior_matches_official_definition_for_3x3():
    import math
    channels = 5  # odd: the official split at channels / 2 = 2.5 gives fractional freqs
    prior = fuse.frequency_prior(channels, 3, **D)
    for i in range(channels):
        for h in range(3):
            for w in range(3):
                if i < channels / 2:
                    ref = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    ref = math.cos(math.pi * (w + 0.5) * (i + 1 - channels / 2) / 3)
                assert abs(prior[i, h, w].item() - ref) < 1e-12
