"""Every block: exact fold (fp64 and fp32), idempotence, deploy keys, gradients.

Property tests draw channels, groups, stride, dilation and kernel size; BN statistics, BN
affine parameters and every branch parameter (OREPA's scales, identity offsets) are random,
so that each branch contributes to the function being compared.
"""
import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from mmreparam.models.layers import (
    ACB,
    DBB,
    OREPA,
    ConvBN,
    OREPA1x1,
    OREPALargeConv,
    OREPAVGGBlock,
    QARepVGGBlock,
    ReparamBlock,
    RepVGGBlock,
)
from mmreparam.models.layers.base import block_type_of_state, block_types
from mmreparam.models.layers.fuse import Affine
from mmreparam.testing import randomized_block

# block -> (supported kernel sizes, supports groups)
BLOCKS = {
    ConvBN: ((1, 3, 5, 7), True),
    ACB: ((3, 5, 7), True),
    DBB: ((3, 5, 7), True),
    RepVGGBlock: ((3, 5, 7), True),
    QARepVGGBlock: ((3, 5, 7), True),
    OREPAVGGBlock: ((3, 5, 7), True),
    OREPA: ((1, 3, 5, 7), True),
    OREPA1x1: ((1, ), False),
    OREPALargeConv: ((5, 7), False),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@st.composite
def block_configs(draw, block):
    sizes, grouped = BLOCKS[block]
    groups = draw(st.sampled_from([1, 2, 3])) if grouped else 1
    cfg = dict(
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=draw(st.sampled_from(sizes)),
        stride=draw(st.sampled_from([1, 2])),
        dilation=draw(st.sampled_from([1, 2])),
        groups=groups)
    if draw(st.booleans()):
        cfg['act_cfg'] = dict(type='ReLU')
    if block in (RepVGGBlock, QARepVGGBlock, OREPAVGGBlock) and draw(st.booleans()):
        cfg['use_se'] = True
        cfg['se_ratio'] = 1
    return cfg


def relative_error(ref, out):
    return ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_fold(block, cfg):
    module = randomized_block(block, cfg)
    size = 2 * cfg['dilation'] * (cfg['kernel_size'] // 2) + 5
    x = torch.randn(2, cfg['in_channels'], size, size + 1, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        unfolded = copy.deepcopy(module).to(dtype)
        folded = copy.deepcopy(unfolded).fold()
        with torch.no_grad():
            ref, out = unfolded(x.to(dtype)), folded(x.to(dtype))
        assert ref.dtype == out.dtype == dtype
        err = relative_error(ref.double(), out.double())
        assert err <= TOL[dtype], f'{block.__name__} {cfg} {dtype}: relative error {err:.3g}'

    folded = copy.deepcopy(module).fold()
    # Folded: one conv with bias, and only the kept parts (act, SE) besides.
    assert isinstance(folded.reparam_conv, torch.nn.Conv2d)
    assert folded.reparam_conv.bias is not None
    assert set(folded._modules) <= {'reparam_conv', 'act', 'se'}
    assert not folded._parameters and not folded._buffers
    # Idempotent.
    conv, state = folded.reparam_conv, copy.deepcopy(folded.state_dict())
    assert folded.fold() is folded and folded.reparam_conv is conv
    assert all(torch.equal(state[k], v) for k, v in folded.state_dict().items())
    # A deploy=True block has exactly the folded keys, loads them strictly, and folds to itself.
    deploy = block(**cfg, deploy=True).double().eval()
    assert set(deploy.state_dict()) == set(folded.state_dict())
    deploy.load_state_dict(folded.state_dict(), strict=True)
    deploy_conv = deploy.reparam_conv
    assert deploy.fold().reparam_conv is deploy_conv
    with torch.no_grad():
        assert torch.equal(deploy(x), folded(x))


@pytest.mark.parametrize('block', list(BLOCKS), ids=lambda b: b.__name__)
def test_fold_is_exact(block):

    @given(cfg=block_configs(block))
    @example(cfg=dict(in_channels=4, out_channels=4, kernel_size=BLOCKS[block][0][-1], stride=1,
                      dilation=1, groups=1))
    def run(cfg):
        check_fold(block, cfg)

    run()


@pytest.mark.parametrize('block', list(BLOCKS), ids=lambda b: b.__name__)
def test_gradients_reach_every_branch(block):
    sizes, grouped = BLOCKS[block]
    cfg = dict(in_channels=4, out_channels=4, kernel_size=sizes[-1], groups=2 if grouped else 1)
    module = randomized_block(block, cfg).train()
    kernel, bias = module.get_equivalent_kernel_bias()
    gen = torch.Generator().manual_seed(0)
    loss = (kernel * torch.randn(kernel.shape, generator=gen, dtype=kernel.dtype)).sum() + \
        (bias * torch.randn(bias.shape, generator=gen, dtype=bias.dtype)).sum()
    loss.backward()
    missing = [n for n, p in module.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f'no gradient through get_equivalent_kernel_bias: {missing}'
    # The training forward reaches every parameter too.
    module.zero_grad()
    module(torch.randn(2, 4, 9, 9, dtype=torch.float64)).square().sum().backward()
    missing = [n for n, p in module.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f'no gradient through the training forward: {missing}'


@pytest.mark.parametrize('block', list(BLOCKS), ids=lambda b: b.__name__)
def test_unsupported_kernel_sizes_are_refused(block):
    sizes, grouped = BLOCKS[block]
    refused = set() if block is ConvBN else {1, 2, 3, 4, 5, 7} - set(sizes)
    for k in refused:
        with pytest.raises(ValueError, match='kernel_size'):
            block(4, 4, k)
    if not grouped:
        with pytest.raises(ValueError, match='groups'):
            block(4, 4, sizes[0], groups=2)


@pytest.mark.parametrize('kwargs,match', [
    (dict(in_channels=3, out_channels=4, groups=2), 'divisible by groups'),
    (dict(in_channels=0, out_channels=4), 'positive int'),
    (dict(in_channels=4, out_channels=4, padding=0), 'padding'),
    (dict(in_channels=4, out_channels=4, norm_cfg=dict(type='GN', num_groups=2)),
     'BatchNorm'),
])
def test_bad_arguments_are_refused(kwargs, match):
    kwargs.setdefault('kernel_size', 3)
    with pytest.raises((ValueError, TypeError), match=match):
        DBB(**kwargs)


def test_helper_tensors_are_not_in_checkpoints():
    keys = set(OREPA(4, 8, 3).state_dict()) | set(OREPAVGGBlock(4, 4, 3).state_dict())
    assert not [k for k in keys if k.endswith(('id_tensor', 'weight_orepa_prior'))]


def test_syncbn_is_accepted_and_folds():
    module = OREPA(4, 4, 3, norm_cfg=dict(type='SyncBN'))
    assert type(module.bn).__name__ == 'SyncBatchNorm'
    # SyncBN's eval forward needs no process group; swap in BN to run on one process.
    kernel, bias = module.get_equivalent_kernel_bias()
    assert kernel.shape == (4, 4, 3, 3) and bias.shape == (4, )


def test_orepa_starts_from_official_branch_scales():
    module = OREPA(4, 8, 3)
    assert module.branch_names == ('origin', 'avg', 'prior', 'conv1x1_kxk', 'conv1x1', 'dw_pw')
    assert module.vector[:, 0].tolist() == [0.25, 0.25, 0.0, 0.5, 1.0, 0.5]
    assert torch.count_nonzero(module.weight_orepa_1x1_kxk_idconv1) == 0
    vgg = OREPAVGGBlock(4, 4, 3).rbr_dense
    assert vgg.branch_names == ('origin', 'avg', 'prior', 'conv1x1_kxk', 'dw_pw')
    assert vgg.vector[:, 0].tolist() == [0.25, 0.25, 0.0, 0.5, 0.5]


def test_all_blocks_share_the_protocol():
    for block in BLOCKS:
        assert issubclass(block, ReparamBlock)
    assert set(block_types()) == set(BLOCKS)


def random_affine(channels, with_bn, seed):
    gen = torch.Generator().manual_seed(seed)

    def draw(low=-1.0, high=1.0):
        return torch.rand(channels, generator=gen, dtype=torch.float64) * (high - low) + low

    if not with_bn:
        return Affine(draw())
    return Affine(draw(), draw(0.5, 2.0), draw(), draw(0.5, 2.0), 1e-3)


def check_expansion(block, cfg, with_bn):
    """``expansion_state(kernel, affine)`` makes the block compute ``affine(conv(x, kernel))``
    (with its own SE and activation after it); the other branches keep their weights."""
    module = randomized_block(block, cfg)
    shape = module.get_equivalent_kernel_bias()[0].shape
    gen = torch.Generator().manual_seed(1)
    kernel = torch.randn(shape, generator=gen, dtype=torch.float64)
    affine = random_affine(cfg['out_channels'], with_bn, seed=2)
    state = module.expansion_state(kernel, affine)
    assert set(state) == set(module.state_dict())
    expanded = copy.deepcopy(module)
    expanded.load_state_dict(state)
    expected = block(**cfg, deploy=True).double().eval()
    weight, bias = affine.fold_into(kernel)
    expected.load_state_dict(dict({k: v for k, v in state.items() if k.startswith('se.')},
                                  **{'reparam_conv.weight': weight, 'reparam_conv.bias': bias}))
    size = 2 * cfg['dilation'] * (cfg['kernel_size'] // 2) + 5
    x = torch.randn(2, cfg['in_channels'], size, size + 1, dtype=torch.float64)
    with torch.no_grad():
        err = relative_error(expected(x), expanded(x))
        k_eq, b_eq = expanded.get_equivalent_kernel_bias()
    assert err <= TOL[torch.float64], f'{block.__name__} {cfg}: relative error {err:.3g}'
    assert torch.allclose(k_eq, weight, rtol=0, atol=1e-10 * weight.abs().max())
    assert torch.allclose(b_eq, bias, rtol=0, atol=1e-10 * bias.abs().max())
    # The round trip through the block's own reduction gives the same function back.
    k_back, a_back = expanded.kernel_and_affine()
    w_back, b_back = a_back.fold_into(k_back)
    assert torch.allclose(w_back, weight, rtol=0, atol=1e-10 * weight.abs().max())
    assert torch.allclose(b_back, bias, rtol=0, atol=1e-10 * bias.abs().max())
    # A folded block takes the folded kernel and bias.
    folded = copy.deepcopy(module).fold()
    folded_state = folded.expansion_state(kernel, affine)
    assert torch.equal(folded_state['reparam_conv.weight'], weight)
    assert torch.equal(folded_state['reparam_conv.bias'], bias)
    # The block's state is recognised as its own type.
    assert block_type_of_state(module.state_dict()) is block


@pytest.mark.parametrize('with_bn', [True, False], ids=['bn', 'bias'])
@pytest.mark.parametrize('block', list(BLOCKS), ids=lambda b: b.__name__)
def test_expansion_is_exact(block, with_bn):

    @given(cfg=block_configs(block))
    @example(cfg=dict(in_channels=4, out_channels=4, kernel_size=BLOCKS[block][0][-1], stride=1,
                      dilation=1, groups=1))
    def run(cfg):
        if block is OREPALargeConv and cfg['out_channels'] < cfg['in_channels'] * 9:
            cfg = dict(cfg, out_channels=cfg['in_channels'] * 9)  # room for the factors
        check_expansion(block, cfg, with_bn)

    run()


def test_qarepvgg_has_no_side_branch_norms():
    block = QARepVGGBlock(4, 4, 3)
    assert isinstance(block.rbr_1x1, torch.nn.Conv2d) and block.rbr_1x1.bias is None
    assert block.has_identity and not hasattr(block, 'rbr_identity')
    assert set(block.state_dict()) >= {'bn.weight', 'rbr_dense.bn.weight', 'rbr_1x1.weight'}
    assert not QARepVGGBlock(4, 8, 3).has_identity
