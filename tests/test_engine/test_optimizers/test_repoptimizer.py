"""RepOptimizer: SGD on a CSLA model == RepOptSGD on the plain model started from its fold.

The core claim of gradient re-parameterization (Ding et al., ICLR 2023): a block
``BN(s * conv3x3 + t * conv1x1 + w_id * x)`` with constant ``s``, ``t`` trained with SGD
(momentum, Nesterov, weight decay) computes exactly what ``BN(conv3x3(W))`` computes when
``W`` starts at the CSLA block's merged kernel and its gradients are multiplied by the
Grad Mult. Checked step by step in float64 (tight) and float32, for one block and for a
whole backbone trained through mmengine's ``build_optim_wrapper``.
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.optim import build_optim_wrapper

from mmreparam.engine import RepOptSGD
from mmreparam.models.backbones import RepOptVGG
from mmreparam.models.backbones.repopt_blocks import CSLABlock, repopt_grad_mult
from mmreparam.models.backbones.repopt_scales import constant_scales
from mmreparam.models.layers import ConvBN
from mmreparam.testing import randomize_bn

TINY = dict(num_blocks=[1, 2, 2, 1], width_factor=[0.125, 0.125, 0.125, 0.125])
SGD = dict(type='SGD', lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
TOL = {torch.float64: 1e-13, torch.float32: 1e-5}


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_scales(model, seed=0):
    """Per-channel scales in [0.5, 1.5) for every block of ``model`` (not the defaults)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: {key: torch.rand(v.shape, generator=gen) + 0.5 for key, v in entry.items()}
            for name, entry in constant_scales(model).items()}


def block_pair(in_channels, out_channels, stride, groups, dtype, seed=0):
    """A CSLA block with random constant scales and the plain block started from its fold."""
    torch.manual_seed(seed)
    csla = CSLABlock(in_channels, out_channels, 3, stride=stride, groups=groups,
                     trainable_scales=False, act_cfg=dict(type='ReLU'))
    gen = torch.Generator().manual_seed(seed + 1)
    csla.set_scales({key: torch.rand(out_channels, generator=gen) + 0.5
                     for key in ('conv', 'conv_1x1', 'identity')})
    randomize_bn(csla, seed=seed + 2)
    csla.to(dtype)
    plain = ConvBN(in_channels, out_channels, 3, stride=stride, groups=groups,
                   act_cfg=dict(type='ReLU')).to(dtype)
    plain.load_state_dict(csla.target_state_dict(), strict=True)
    return csla, plain


def train_block(block, optimizer, inputs, targets):
    block.train()
    for x, y in zip(inputs, targets):
        optimizer.zero_grad()
        ((block(x) - y)**2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
@pytest.mark.parametrize('geometry', [(8, 8, 1, 1), (8, 16, 2, 1), (8, 8, 1, 2)],
                         ids=['identity', 'stride2', 'groups2'])
def test_csla_block_sgd_equals_repopt_sgd(geometry, weight_decay, dtype):
    in_c, out_c, stride, groups = geometry
    csla, plain = block_pair(in_c, out_c, stride, groups, dtype)
    start = csla.merged_kernel().detach().clone()
    gen = torch.Generator().manual_seed(3)
    steps = 5
    inputs = [torch.randn(4, in_c, 8, 8, generator=gen).to(dtype) for _ in range(steps)]
    targets = [torch.randn(4, out_c, 8 // stride, 8 // stride, generator=gen).to(dtype)
               for _ in range(steps)]
    hyper = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    mult = repopt_grad_mult(csla.get_scales(), plain.conv.weight.shape, groups, dtype)
    unmultiplied = copy.deepcopy(plain)  # negative control: plain SGD on the plain block

    train_block(csla, torch.optim.SGD(csla.parameters(), **hyper), inputs, targets)
    train_block(plain, RepOptSGD(plain.parameters(), [(plain.conv.weight, mult)], **hyper),
                inputs, targets)
    train_block(unmultiplied, torch.optim.SGD(unmultiplied.parameters(), **hyper), inputs,
                targets)

    kernel = csla.merged_kernel().detach()
    assert rel_err(kernel, start) > 1e-2  # it trained
    err = rel_err(plain.conv.weight, kernel)
    assert err < TOL[dtype], err
    for key, value in csla.bn.state_dict().items():
        if value.is_floating_point():
            assert rel_err(plain.bn.state_dict()[key], value) < TOL[dtype], key
    assert rel_err(unmultiplied.conv.weight, kernel) > 50 * TOL[torch.float32]
    csla.eval(), plain.eval()
    x = torch.randn(2, in_c, 8, 8, dtype=dtype)
    with torch.no_grad():
        assert rel_err(plain(x), csla(x)) < 10 * TOL[dtype]


def test_gradient_clipping_breaks_the_equivalence():
    """Why the constructor warns on clip_grad: the two models' gradient norms differ."""
    errors = {}
    for clip in (None, 0.05):
        csla, plain = block_pair(8, 8, 1, 1, torch.float64)
        mult = repopt_grad_mult(csla.get_scales(), plain.conv.weight.shape,
                                dtype=torch.float64)
        optimizers = (torch.optim.SGD(csla.parameters(), lr=0.1, momentum=0.9),
                      RepOptSGD(plain.parameters(), [(plain.conv.weight, mult)],
                                lr=0.1, momentum=0.9))
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randn(4, 8, 8, 8, generator=gen, dtype=torch.float64)
            for block, optimizer in zip((csla, plain), optimizers):
                optimizer.zero_grad()
                block(x).square().mean().backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(block.parameters(), clip)
                optimizer.step()
        errors[clip] = rel_err(plain.conv.weight, csla.merged_kernel().detach())
    assert errors[None] < TOL[torch.float64] < 1e-6 < errors[0.05], errors


def run_backbone(model, optim_cfg, steps, dtype, seed=5):
    """Train with mmengine's optim wrapper (64x64 inputs: BN over 1x1 maps is too
    ill-conditioned to compare roundings)."""
    wrapper = build_optim_wrapper(model, optim_cfg)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        outs = model(torch.randn(2, 3, 64, 64, generator=gen).to(dtype))
        weights = [torch.randn(o.shape[1:], generator=gen).to(dtype) for o in outs]
        wrapper.update_params(sum((o * w).mean() for o, w in zip(outs, weights)))
    return wrapper


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_backbone_through_mmengine_equals_csla(dtype):
    """A CSLA RepOptVGG trained with SGD vs the target RepOptVGG with the constructor."""
    csla = RepOptVGG(TINY, mode='csla', out_indices=(0, 1, 2, 3))
    scales = random_scales(csla)
    csla = RepOptVGG(TINY, mode='csla', scales=scales, out_indices=(0, 1, 2, 3))
    csla.init_weights()
    randomize_bn(csla, seed=1).to(dtype)
    target = RepOptVGG(TINY, mode='target', scales=scales, out_indices=(0, 1, 2, 3)).to(dtype)
    target.load_state_dict(csla.target_state_dict(), strict=True)
    start = {name: b.merged_kernel().detach().clone()
             for name, b in csla.repopt_blocks().items()}
    paramwise = dict(norm_decay_mult=0.0)
    run_backbone(csla, dict(optimizer=SGD, paramwise_cfg=paramwise), 5, dtype)
    wrapper = run_backbone(target, dict(constructor='mmreparam.RepOptimizerConstructor',
                                        optimizer=SGD, paramwise_cfg=paramwise), 5, dtype)
    assert isinstance(wrapper.optimizer, RepOptSGD)
    assert len(wrapper.optimizer.grad_mults) == len(target.repopt_blocks()) == 7
    errors = []
    for name, block in csla.repopt_blocks().items():
        kernel = block.merged_kernel().detach()
        assert rel_err(kernel, start[name]) > 1e-3, name  # every kernel trained
        errors.append(rel_err(target.repopt_blocks()[name].conv.weight, kernel))
    assert max(errors) < TOL[dtype] * 10, errors
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        for a, b in zip(target.eval()(x), csla.eval()(x)):
            assert rel_err(a, b) < TOL[dtype] * 10


def test_constructor_adopts_optimizer_scales_before_init():
    model = RepOptVGG(TINY)  # scales=None
    scales = random_scales(model, seed=4)
    cfg = dict(constructor='mmreparam.RepOptimizerConstructor', optimizer=SGD, scales=scales)
    wrapper = build_optim_wrapper(model, cfg)
    assert model.get_scales()['stem']['conv'].equal(scales['stem']['conv'])  # adopted
    stage = model.repopt_blocks()['stage_2.1']
    mult = dict((id(p), m) for p, m in wrapper.optimizer.grad_mults)[id(stage.conv.weight)]
    entry = scales['stage_2.1']
    expected = entry['conv'] ** 2 + entry['conv_1x1'] ** 2 + 1  # centre of the diagonal
    assert torch.allclose(mult[:, :, 1, 1].diagonal(), expected)
    assert torch.allclose(mult[:, :, 0, 0], (entry['conv'] ** 2)[:, None].expand_as(
        mult[:, :, 0, 0]))
    # Rule of Initialization with the adopted scales: t = 0, w_id = 0 leaves s * W.
    model = RepOptVGG(TINY)
    zeroed = {name: dict(e, conv_1x1=torch.zeros_like(e['conv_1x1']),
                         **({'identity': torch.zeros_like(e['identity'])}
                            if 'identity' in e else {}))
              for name, e in scales.items()}
    build_optim_wrapper(model, dict(cfg, scales=zeroed))
    before = model.stem.conv.weight.detach().clone()
    model.init_weights()
    assert torch.allclose(model.stem.conv.weight, before * zeroed['stem']['conv'].reshape(
        -1, 1, 1, 1))


def test_constructor_refuses_conflicting_scales():
    model = RepOptVGG(TINY, scales='const')
    cfg = dict(constructor='mmreparam.RepOptimizerConstructor', optimizer=SGD,
               scales=random_scales(model))
    with pytest.raises(ValueError, match='other scales'):
        build_optim_wrapper(model, cfg)
    model = RepOptVGG(TINY)
    model.init_weights()  # kernels built from the constant scales
    with pytest.raises(ValueError, match='initialized from'):
        build_optim_wrapper(model, cfg)
    build_optim_wrapper(model, dict(cfg, scales='const'))  # the same scales: fine


def test_clip_grad_warns_and_bad_configs_fail():
    model = RepOptVGG(TINY)
    cfg = dict(constructor='mmreparam.RepOptimizerConstructor', optimizer=SGD)
    with pytest.warns(UserWarning, match='clip_grad.*breaks the equivalence'):
        wrapper = build_optim_wrapper(model, dict(cfg, clip_grad=dict(max_norm=1.0)))
    assert isinstance(wrapper.optimizer, RepOptSGD)
    with pytest.raises(ValueError, match='needs optimizer type SGD'):
        build_optim_wrapper(model, dict(cfg, optimizer=dict(type='AdamW', lr=1e-3)))
    with pytest.raises(ValueError, match='no module with Grad Mults'):
        build_optim_wrapper(torch.nn.Conv2d(3, 3, 3), cfg)
    with pytest.raises(ValueError, match="mode='target'"):
        build_optim_wrapper(RepOptVGG(TINY, mode='hs'), cfg)


def test_repopt_sgd_validates_grad_mults():
    conv = torch.nn.Conv2d(2, 2, 3)
    other = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match='does not update'):
        RepOptSGD(conv.parameters(), [(other, torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match='shape'):
        RepOptSGD(conv.parameters(), [(conv.weight, torch.ones(2))], lr=0.1)
    optimizer = RepOptSGD(conv.parameters(), [(conv.weight, torch.full_like(conv.weight, 3))],
                          lr=0.1)
    conv.weight.grad = torch.ones_like(conv.weight)
    start = conv.weight.detach().clone()
    optimizer.step()  # no momentum, no decay: W -= lr * 3 * 1
    assert torch.allclose(conv.weight, start - 0.3)
    assert set(optimizer.state_dict()) == {'state', 'param_groups'}


def test_constructor_resolves_from_a_fresh_interpreter():
    """``constructor='mmreparam.RepOptimizerConstructor'`` without importing mmreparam."""
    code = textwrap.dedent('''
        import sys
        from mmengine.optim import build_optim_wrapper
        from mmengine.registry import MODELS
        assert 'mmreparam' not in sys.modules
        model = MODELS.build(dict(type='mmreparam.RepOptVGG', arch=dict(
            num_blocks=[1, 1, 1, 1], width_factor=[0.125] * 4)))
        wrapper = build_optim_wrapper(model, dict(
            constructor='mmreparam.RepOptimizerConstructor',
            optimizer=dict(type='SGD', lr=0.1, momentum=0.9)))
        print(type(wrapper.optimizer).__name__)
    ''')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == 'RepOptSGD'
