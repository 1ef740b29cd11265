"""RepMLPBlock: exact fold (fp64 and fp32, square and non-square partitions), idempotence,
deploy keys, gradients, argument checks; the fold math it adds (conv_to_fc,
fuse_preceding_bn); and the Foldable protocol through which mmreparam.fold reaches it.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from test_blocks import TOL, relative_error

import mmreparam
from mmreparam.models.layers import ConvBN, Foldable, RepMLPBlock
from mmreparam.models.layers.fuse import conv_to_fc, fuse_preceding_bn
from mmreparam.testing import randomize_bn, randomized_block


@st.composite
def repmlp_configs(draw):
    """A block config and an input size (H, W) it takes."""
    groups = draw(st.sampled_from([1, 2, 3]))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kernels = [k for k in (1, 3, 5) if k <= min(h, w)]
    cfg = dict(in_channels=groups * draw(st.integers(1, 2)),
               out_channels=groups * draw(st.integers(1, 2)), partition_size=(h, w),
               reparam_conv_kernels=tuple(draw(st.lists(st.sampled_from(kernels),
                                                        unique=True))),
               groups=groups, global_perceptron=draw(st.sampled_from(['partition', 'channel',
                                                                     None])))
    size = (h * draw(st.integers(1, 3)), w * draw(st.integers(1, 3)))
    if cfg['global_perceptron'] == 'partition':
        cfg['input_size'] = size
    elif draw(st.booleans()):  # a size that is not a multiple of the partition
        cfg['pad_input'] = True
        size = (size[0] + draw(st.integers(0, h - 1)), size[1] + draw(st.integers(0, w - 1)))
    return cfg, size


def check_fold(cfg, size):
    block = randomized_block(RepMLPBlock, cfg)
    x = torch.randn(2, cfg['in_channels'], *size, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        unfolded = copy.deepcopy(block).to(dtype)
        folded = copy.deepcopy(unfolded).fold()
        with torch.no_grad():
            ref, out = unfolded(x.to(dtype)), folded(x.to(dtype))
        assert ref.shape == (2, cfg['out_channels'], *size) and out.dtype == dtype
        err = relative_error(ref.double(), out.double())
        assert err <= TOL[dtype], f'{cfg} {size} {dtype}: relative error {err:.3g}'

    folded = copy.deepcopy(block).fold()
    # Folded: fc3 with bias, no BN, no local branches; the global perceptron's BN is gone.
    assert folded.folded and folded.fc3.bias is not None and folded.fc3_bn is None
    assert not [n for n, _ in folded.named_modules() if 'repconv' in n or n.endswith('bn')]
    # Idempotent.
    fc3, state = folded.fc3, copy.deepcopy(folded.state_dict())
    assert folded.fold() is folded and folded.fc3 is fc3
    assert all(torch.equal(state[k], v) for k, v in folded.state_dict().items())
    # A deploy=True block has exactly the folded keys, loads them strictly, folds to itself.
    deploy = RepMLPBlock(**cfg, deploy=True).double().eval()
    assert deploy.folded and list(deploy.state_dict()) == list(folded.state_dict())
    deploy.load_state_dict(folded.state_dict(), strict=True)
    assert deploy.fold().fc3 is deploy.fc3
    with torch.no_grad():
        assert torch.equal(deploy(x), folded(x))


@given(case=repmlp_configs())
@example(case=(dict(in_channels=8, out_channels=8, partition_size=7,
                    reparam_conv_kernels=(1, 3, 5, 7), groups=4, input_size=14), (14, 14)))
@example(case=(dict(in_channels=4, out_channels=6, partition_size=(4, 3),
                    reparam_conv_kernels=(1, 3), groups=2, input_size=(8, 9)), (8, 9)))
@example(case=(dict(in_channels=6, out_channels=6, partition_size=(3, 5),
                    reparam_conv_kernels=(3, 1), groups=3, global_perceptron='channel',
                    pad_input=True), (7, 11)))
def test_fold_is_exact(case):
    check_fold(*case)


def test_gradients_reach_every_parameter():
    block = randomized_block(RepMLPBlock, dict(
        in_channels=4, out_channels=4, partition_size=(3, 5), reparam_conv_kernels=(1, 3),
        groups=2, input_size=(6, 10))).train()
    weight, bias = block.get_equivalent_fc3()
    fc1_weight, fc1_bias = block.gp.get_equivalent_fc1()
    gen = torch.Generator().manual_seed(0)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
               for t in (weight, bias, fc1_weight, fc1_bias))
    loss.backward()
    missing = [n for n, p in block.named_parameters()
               if not n.startswith('gp.fc2') and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f'no gradient through get_equivalent_fc3/fc1: {missing}'
    block.zero_grad()
    block(torch.randn(2, 4, 6, 10, dtype=torch.float64)).square().sum().backward()
    missing = [n for n, p in block.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f'no gradient through the training forward: {missing}'


def test_parameter_names_follow_the_official_layout():
    block = RepMLPBlock(4, 4, (2, 3), (1, ), input_size=(4, 6))
    assert {k.rsplit('.', 1)[0] for k in block.state_dict()} == {
        'gp.bn', 'gp.fc1', 'gp.fc2', 'fc3', 'fc3_bn', 'repconv1.conv', 'repconv1.bn'}
    assert block.fc3.weight.shape == (24, 24, 1, 1) and block.gp.fc1.in_features == 16
    # A single partition has no global perceptron (paper, Sec. 3.2).
    assert RepMLPBlock(4, 4, 3, (1, ), input_size=3).gp is None


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_channels=6, out_channels=4, groups=4), 'divisible by groups'),
    (dict(in_channels=0), 'positive int'),
    (dict(partition_size=(4, 0)), 'partition_size'),
    (dict(reparam_conv_kernels=(1, 2)), 'odd'),
    (dict(partition_size=(5, 3), reparam_conv_kernels=(1, 5)), 'no larger than the 5x3'),
    (dict(reparam_conv_kernels=(3, 3)), 'repeats'),
    (dict(global_perceptron='spatial'), 'global_perceptron'),
    (dict(input_size=None), 'needs input_size'),
    (dict(input_size=(14, 15)), 'not divisible'),
    (dict(pad_input=True), 'pad_input'),
    (dict(global_perceptron='channel', input_size=14), 'only used by'),
    (dict(gp_reduction=0), 'reduction'),
    (dict(norm_cfg=dict(type='GN', num_groups=2)), 'BatchNorm'),
])
def test_bad_arguments_are_refused(kwargs, match):
    cfg = dict(in_channels=4, out_channels=4, partition_size=7, input_size=14)
    cfg.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        RepMLPBlock(**cfg)


def test_bad_input_sizes_are_refused():
    block = RepMLPBlock(4, 4, (4, 2), (1, ), input_size=(8, 8)).eval()
    with pytest.raises(ValueError, match='takes 8x8 inputs only'):
        block(torch.randn(1, 4, 8, 6))
    block = RepMLPBlock(4, 4, (4, 2), (1, ), global_perceptron=None).eval()
    assert block(torch.randn(1, 4, 8, 6)).shape == (1, 4, 8, 6)
    with pytest.raises(ValueError, match='pad_input=True'):
        block(torch.randn(1, 4, 9, 6))


def test_conv_to_fc_is_the_convolution_as_a_matrix():
    gen = torch.Generator().manual_seed(0)
    kernel = torch.randn(6, 2, 3, 5, generator=gen, dtype=torch.float64)  # non-square too
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, 4, 7, generator=gen, dtype=torch.float64)  # h != w
    weight, fc_bias = conv_to_fc(kernel, bias, (4, 7), groups=2)
    assert weight.shape == (6 * 28, 2 * 28)
    fc = F.conv2d(x.reshape(3, -1, 1, 1), weight.reshape(6 * 28, 2 * 28, 1, 1), fc_bias,
                  groups=2).reshape(3, 6, 4, 7)
    conv = F.conv2d(x, kernel, bias, padding=(1, 2), groups=2)
    assert torch.allclose(fc, conv, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match='odd'):
        conv_to_fc(kernel[..., :2], None, 4)


def test_fuse_preceding_bn_is_exact():
    bn = randomize_bn(nn.BatchNorm2d(3), seed=1).double().eval()
    fc = nn.Linear(12, 5).double()
    weight, bias = fuse_preceding_bn(fc.weight, fc.bias, bn)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(F.linear(x.flatten(1), weight, bias), fc(bn(x).flatten(1)),
                              rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match='linear layer or a 1x1'):
        fuse_preceding_bn(torch.zeros(5, 3, 3, 3), None, bn)


class _ForeignFoldable(nn.Module):
    """Has ``fold`` and ``folded`` but is not mmreparam's: fold_tree must leave it alone."""
    folded = False

    def fold(self):
        raise AssertionError('fold_tree folded a module that is not mmreparam\'s')

    def forward(self, x):
        return x


def test_fold_tree_folds_every_foldable():
    block = randomized_block(RepMLPBlock, dict(in_channels=4, out_channels=4, partition_size=2,
                                               reparam_conv_kernels=(1, ),
                                               global_perceptron=None))
    model = nn.Sequential(block, ConvBN(4, 4, 3).double().eval(), _ForeignFoldable())
    assert isinstance(block, Foldable) and isinstance(model[1], Foldable)
    folded = mmreparam.fold(model)
    assert folded[0].folded and folded[1].folded and not model[0].folded  # a deep copy
    x = torch.randn(1, 4, 4, 6, dtype=torch.float64)
    assert mmreparam.fold_error(model, folded, x)['max_rel'] < 1e-10
    from mmreparam.models.layers.foreign import fold_tree
    assert fold_tree(folded) == 0  # nothing left to fold
