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
    ReparamBlock,
    RepVGGBlock,
)
from mmreparam.testing import randomize_bn, randomize_parameters

# block -> (supported kernel sizes, supports groups)
BLOCKS = {
    ConvBN: ((1, 3, 5, 7), True),
    ACB: ((3, 5, 7), True),
    DBB: ((3, 5, 7), True),
    RepVGGBlock: ((3, 5, 7), True),
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
    if block in (RepVGGBlock, OREPAVGGBlock) and draw(st.booleans()):
        cfg['use_se'] = True
        cfg['se_ratio'] = 1
    return cfg


def make_block(block, cfg, seed=0):
    torch.manual_seed(seed)
    module = block(**cfg).double()
    randomize_parameters(module, ('', ), seed=seed)  # every parameter, zero-inits included
    randomize_bn(module, seed=seed + 1)
    return module.eval()


def relative_error(ref, out):
    return ((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_fold(block, cfg):
    module = make_block(block, cfg)
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
    module = make_block(block, cfg).train()
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
