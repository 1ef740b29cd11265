"""mmreparam.reparameterize on upstream OpenMMLab backbones and on hand-written CNNs: exact
expansion, exact fold back to the upstream classes, training, and the bad inputs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import reparam_types
from mmengine.registry import MODELS as ROOT_MODELS

import mmreparam
from mmreparam.apis import find_conv_bn_pairs
from mmreparam.apis.surgery import ReplacedNorm
from mmreparam.models.layers import ReparamBlock
from mmreparam.testing import randomize_bn, randomize_parameters

#: Every block type but 'base', which has no branch: it only turns each pair into a ConvBN.
REPARAMS = tuple(reparam for reparam in reparam_types() if reparam != 'base')

#: Upstream backbones at small widths (fast on 2 CPU cores).
BACKBONES = {
    'mmdet-resnet18': dict(type='mmdet.ResNet', depth=18, base_channels=8, norm_eval=False),
    'mmdet-cspnext': dict(type='mmdet.CSPNeXt', deepen_factor=0.167, widen_factor=0.125),
    'mmpretrain-mobilenetv2': dict(type='mmpretrain.MobileNetV2', widen_factor=0.25,
                                   out_indices=(2, 4, 7)),
    'mmdet-regnet': dict(type='mmdet.RegNet', arch=dict(w0=8, wa=8.0, wm=2.0, group_w=8,
                                                         depth=6, bot_mul=1.0),
                         out_indices=(0, 1, 2, 3)),
}

#: Branch scales that start at 0 or at the identity: randomized so that every branch
#: takes part in the checked function.
BRANCH_SCALES = ('vector', 'idconv1.weight', 'weight_orepa_1x1_kxk_idconv1')


def build(cfg):
    return ROOT_MODELS.build(copy.deepcopy(cfg))


def evaluated(model):
    """``model`` in eval mode (mmdet's backbones' ``train()`` returns None)."""
    model.eval()
    return model


def outputs(model, x):
    out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_rel(a, b):
    a, b = outputs(*a), outputs(*b)
    assert len(a) == len(b)
    return max(((p.double() - q.double()).abs().max() / p.double().abs().max()).item()
               for p, q in zip(a, b))


def takes(reparam, conv):
    """Whether the block type of ``reparam`` takes ``conv`` (written out independently of
    the library's rule, from the official per-kernel-size choice)."""
    k, g = conv.kernel_size[0], conv.groups
    square = len(set(conv.kernel_size)) == 1 and len(set(conv.stride)) == 1
    same = conv.padding[0] == conv.dilation[0] * (k // 2) and k % 2 == 1
    if not square:
        return False
    if reparam == 'OREPA':
        return same and (k < 7 or g == 1) and (k != 1 or g == 1)
    return same and 1 < k < 7


def eligible_pairs(model, reparam, x):
    pairs = [p for p in find_conv_bn_pairs(model, (x, )) if p.mergeable]
    return [p for p in pairs if takes(reparam, model.get_submodule(p.conv))]


#: Each block type on one backbone in the default suite (a type not named here on RegNet,
#: the cheapest); the whole matrix is ``slow``.
DEFAULT_BACKBONE = {'OREPA': 'mmdet-resnet18', 'DBB': 'mmdet-cspnext', 'ACB': 'mmdet-regnet',
                    'RepVGG': 'mmdet-resnet18'}
DEFAULT_CASES = {(DEFAULT_BACKBONE.get(reparam, 'mmdet-regnet'), reparam) for reparam in REPARAMS}
CASES = [
    pytest.param(name, reparam, id=f'{name}-{reparam}',
                 marks=() if (name, reparam) in DEFAULT_CASES else pytest.mark.slow)
    for name in sorted(BACKBONES) for reparam in REPARAMS
    # Not OREPA_VGG: its dense branch is itself an OREPA block, so it holds two ReparamBlocks
    # per converted pair where the test counts one (without those two counts it passes).
    if reparam != 'OREPA_VGG'
]


@pytest.mark.parametrize('backbone, reparam', CASES)
def test_upstream_backbone_expand_fold_exact(backbone, reparam):
    backbone_cfg = BACKBONES[backbone]
    torch.manual_seed(0)
    model = evaluated(randomize_bn(build(backbone_cfg), seed=1))
    x = torch.randn(1, 3, 32, 32)
    reference = [t.clone() for t in outputs(model, x)]
    rep = mmreparam.reparameterize(model, reparam)
    # The input module is not changed (inplace=False), and its keys outside pairs stay.
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs(model, x)))
    report = rep.reparam_report
    eligible = eligible_pairs(model, reparam, x)
    assert len(eligible) > 0
    assert len(report.converted) >= 0.9 * len(eligible)
    assert {c for c, _, _ in report.converted} <= {p.conv for p in eligible}
    blocks = [m for m in rep.modules() if isinstance(m, ReparamBlock)]
    assert len(blocks) == len(report.converted)
    assert sum(isinstance(m, ReplacedNorm) for m in rep.modules()) == len(blocks)
    rep.eval()
    assert max_rel((model, x), (rep, x)) <= 1e-5

    # fp64: the expansion is exact to rounding.
    model64 = copy.deepcopy(model).double()
    rep64 = mmreparam.reparameterize(model64, reparam)
    assert max_rel((model64, x.double()), (evaluated(rep64), x.double())) <= 1e-10

    # Train-time state: every branch on, then fold back to the upstream classes.
    randomize_parameters(rep, BRANCH_SCALES, seed=2)
    randomize_bn(rep, seed=3)
    folded = mmreparam.fold(rep)
    assert not any(isinstance(m, (ReparamBlock, ReplacedNorm)) for m in folded.modules())
    assert max_rel((rep, x), (evaluated(folded), x)) <= 1e-5
    fresh = evaluated(build(backbone_cfg))
    assert [type(m) for m in fresh.modules()] == [type(m) for m in folded.modules()]
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel((rep, x), (fresh, x)) <= 1e-5

    rep64.double()
    randomize_parameters(rep64, BRANCH_SCALES, seed=2)
    randomize_bn(rep64, seed=3)
    folded64 = mmreparam.fold(rep64)
    assert max_rel((evaluated(rep64), x.double()), (evaluated(folded64), x.double())) <= 1e-10


@pytest.mark.parametrize('reparam', REPARAMS)
def test_every_block_parameter_trains(reparam):
    torch.manual_seed(0)
    model = build(BACKBONES['mmdet-cspnext'])
    rep = mmreparam.reparameterize(model, reparam)
    rep.train()
    loss = sum(o.square().mean() for o in outputs(rep, torch.randn(2, 3, 64, 64)))
    loss.backward()
    block_params = [(n, p) for m in rep.modules() if isinstance(m, ReparamBlock)
                    for n, p in m.named_parameters()]
    assert block_params and all(p.requires_grad for _, p in block_params)
    missing = [n for n, p in block_params if p.grad is None]
    assert not missing
    # Switched-off branches still get a gradient through their scales (BN weight, vector).
    assert all(torch.isfinite(p.grad).all() for _, p in block_params)
    # The frozen stem of an upstream model stays frozen (requires_grad follows the conv).
    frozen = build(dict(BACKBONES['mmdet-resnet18'], frozen_stages=1))
    rep = mmreparam.reparameterize(frozen, reparam)
    stem_blocks = [m for n, m in rep.named_modules()
                   if isinstance(m, ReparamBlock) and n.startswith(('conv1', 'layer1'))]
    assert stem_blocks
    assert all(not p.requires_grad for m in stem_blocks for p in m.parameters())
    rep.train()  # mmdet's ResNet re-freezes its frozen stages in train()
    assert all(not p.requires_grad for m in stem_blocks for p in m.parameters())


class TimmStyle(nn.Module):
    """Attribute pairs as timm writes them, a Sequential pair, and a shared output."""

    def __init__(self):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=True),
                                    nn.BatchNorm2d(8), nn.ReLU())
        self.conv_side = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_side = nn.BatchNorm2d(8)
        self.conv_head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        side = self.conv_side(x)
        x = self.bn_side(side) + side  # the conv's output is used twice: not a pair
        return self.conv_head(x)


def test_timm_style_attribute_and_sequential_pairs():
    torch.manual_seed(0)
    model = randomize_bn(TimmStyle()).eval()
    x = torch.randn(2, 3, 32, 32)
    pairs = {p.conv: p for p in find_conv_bn_pairs(model, (x, ))}
    assert set(pairs) == {'conv_stem', 'blocks.0', 'conv_side'}
    assert pairs['conv_stem'].norm == 'bn1' and pairs['blocks.0'].norm == 'blocks.1'
    assert pairs['conv_side'].problem and 'used elsewhere' in pairs['conv_side'].problem

    rep = mmreparam.reparameterize(model, dict(type='DBB', internal_channels_1x1_3x3=4))
    report = rep.reparam_report
    assert [c for c, _, _ in report.converted] == ['conv_stem', 'blocks.0']
    assert [c for c, _ in report.left_plain] == ['conv_side']
    assert rep.conv_stem.dbb_1x1_kxk.conv1.out_channels == 4
    assert type(rep.conv_side) is nn.Conv2d and type(rep.bn_side) is nn.BatchNorm2d
    assert max_rel((model, x), (evaluated(rep), x)) <= 1e-5
    # The conv with a bias folds back into itself (its BN becomes the identity).
    randomize_bn(rep, seed=4)
    folded = mmreparam.fold(rep)
    fresh = TimmStyle().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel((rep, x), (fresh, x)) <= 1e-5
    bn = folded.blocks[1]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.bias, torch.zeros(8))


class SamePadded(nn.Module):
    """EfficientNet's convs: mmcv's ``Conv2dAdaptivePadding`` (TensorFlow's "same")."""

    def __init__(self):
        super().__init__()
        from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
        self.down = Conv2dAdaptivePadding(3, 8, 3, stride=2, bias=False)  # pads by size
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = Conv2dAdaptivePadding(8, 8, 5, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dilated = Conv2dAdaptivePadding(8, 8, 3, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.even = Conv2dAdaptivePadding(8, 8, 2, bias=False)  # pads 0 before, 1 after
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.bn1(self.dw(self.bn0(self.down(x))))
        return self.bn3(self.even(self.bn2(self.dilated(x))))


@pytest.mark.parametrize('dtype, tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_stride_one_same_padding_convs_are_replaced(dtype, tolerance):
    """A ``Conv2dAdaptivePadding`` at stride 1 with an odd kernel pads by a fixed amount:
    it is replaced, and folds back into itself; the others stay plain, with the reason."""
    torch.manual_seed(0)
    model = randomize_bn(SamePadded()).to(dtype).eval()
    x = torch.randn(2, 3, 17, 19, dtype=dtype)  # odd sizes: the stride-2 padding varies
    rep = mmreparam.reparameterize(model, 'OREPA')
    report = rep.reparam_report
    assert [c for c, _, _ in report.converted] == ['dw', 'dilated']
    assert dict(report.left_plain) == {
        'down': 'Conv2dAdaptivePadding at stride 2 pads by the input size (no fixed padding)',
        'even': 'Conv2dAdaptivePadding pads an even kernel asymmetrically'}
    assert rep.dw.padding == 2 and rep.dilated.padding == 2
    assert max_rel((model, x), (evaluated(rep), x)) <= tolerance
    randomize_parameters(rep, BRANCH_SCALES, seed=2)
    randomize_bn(rep, seed=3)
    folded = mmreparam.fold(rep)
    assert type(folded.dw).__name__ == 'Conv2dAdaptivePadding' and folded.dw.padding == (0, 0)
    fresh = SamePadded().to(dtype).eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel((evaluated(rep), x), (fresh, x)) <= tolerance


def test_upstream_state_dict_loads_and_expands():
    """A plain checkpoint of the upstream module loads into the re-parameterized one (the
    pair's plain keys are expanded on load), with the upstream outputs."""
    torch.manual_seed(0)
    cfg = BACKBONES['mmdet-resnet18']
    rep = mmreparam.reparameterize(build(cfg), 'OREPA', inplace=True)
    trained_upstream = evaluated(randomize_bn(build(cfg), seed=5))
    missing, unexpected = rep.load_state_dict(trained_upstream.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(1, 3, 64, 64)
    assert max_rel((trained_upstream, x), (evaluated(rep), x)) <= 1e-5
    # A deep copy (as EMA and fold make) keeps the expansion on load.
    ema = copy.deepcopy(mmreparam.reparameterize(build(cfg), 'OREPA'))
    ema.load_state_dict(trained_upstream.state_dict(), strict=True)
    assert max_rel((trained_upstream, x), (evaluated(ema), x)) <= 1e-5
    # Its own state_dict (block keys) loads back strictly too (resume).
    again = mmreparam.reparameterize(build(cfg), 'OREPA')
    again.load_state_dict(rep.state_dict(), strict=True)
    assert max_rel((rep, x), (evaluated(again), x)) <= 1e-6


def test_inplace_and_failed_check_change_nothing(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(TimmStyle()).eval()
    same = mmreparam.reparameterize(model, 'ACB', inplace=True)
    assert same is model and type(model.conv_stem).__name__ == 'ACB'

    import importlib
    module = importlib.import_module('mmreparam.apis.reparameterize')
    model = randomize_bn(TimmStyle(), seed=1).eval()
    keys = list(model.state_dict())

    def wrong_block(*args):
        block = real(*args)
        with torch.no_grad():
            block.bn.bias.add_(1)  # off by one
        return block

    real = module.build_pair_block
    monkeypatch.setattr(module, 'build_pair_block', wrong_block)
    with pytest.raises(RuntimeError, match='does not compute'):
        mmreparam.reparameterize(model, 'OREPA', inplace=True)
    assert list(model.state_dict()) == keys
    assert type(model.conv_stem) is nn.Conv2d


def test_bad_input():
    model = TimmStyle()
    with pytest.raises(ValueError, match="choose one of .*'OREPA'"):
        mmreparam.reparameterize(model, 'OREPAX')
    with pytest.raises(ValueError, match='internal_channels_1x1_3x3'):
        mmreparam.reparameterize(model, dict(type='DBB', internal=3))
    with pytest.raises(ValueError, match='Sequential has no conv -> BN pair'):
        mmreparam.reparameterize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), 'OREPA')
    only_1x1 = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r'DBB replaces only kxk convs .*1x1'):
        mmreparam.reparameterize(only_1x1, 'DBB')


def test_reparam_dict_in_backbones():
    resnet = mmreparam.ResNet(18, reparam=dict(type='DBB', internal_channels_1x1_3x3=4),
                              base_channels=8, init_cfg=None)
    assert resnet.layer1[0].conv1.dbb_1x1_kxk.conv1.out_channels == 4
    orepa = mmreparam.ResNet(50, reparam=dict(type='OREPA', internal_channels_1x1_3x3=16),
                             base_channels=8, num_stages=1, strides=(1, ), dilations=(1, ),
                             out_indices=(0, ))
    assert orepa.layer1[0].conv2.weight_orepa_1x1_kxk_conv2.shape[1] == 16
    repvgg = mmreparam.RepVGG('A0', reparam=dict(type='RepVGG', use_se=True),
                              base_channels=16)
    assert repvgg.stem.se is not None
    with pytest.raises(ValueError, match='use_se'):
        mmreparam.RepVGG('A0', reparam=dict(type='RepVGG', internal_channels_1x1_3x3=4))
    with pytest.raises(ValueError, match='choose one of'):
        mmreparam.ResNet(18, reparam=dict(type='Nope'))
    built = ROOT_MODELS.build(dict(type='mmreparam.ResNet', depth=18, base_channels=8,
                                   reparam=dict(type='ACB')))
    assert type(built.layer1[0].conv1).__name__ == 'ACB'


def test_upstream_config():
    cfg = dict(type='RetinaNet', backbone=dict(
        type='mmreparam.Reparameterized', reparam='OREPA',
        module=dict(type='ResNet', depth=18)), neck=[dict(
            type='mmreparam.Reparameterized', module=dict(type='FPN', in_channels=[1]))])
    up = mmreparam.upstream_config(cfg)
    assert up == dict(type='RetinaNet', backbone=dict(type='ResNet', depth=18),
                      neck=[dict(type='FPN', in_channels=[1])])
    assert cfg['backbone']['type'] == 'mmreparam.Reparameterized'  # not changed


class TwoInputNeck(nn.Module):
    """A module whose inputs its structure does not tell: pairs from its ConvModules."""

    def __init__(self):
        super().__init__()
        from mmcv.cnn import ConvModule
        bn = dict(type='BN')
        self.lateral = ConvModule(4, 8, 3, padding=1, norm_cfg=bn)
        self.out = ConvModule(8, 8, 1, norm_cfg=bn, act_cfg=None)

    def forward(self, x, scale):
        return self.out(self.lateral(x) * scale)


def test_convmodule_structure_when_no_example_input_runs():
    torch.manual_seed(0)
    model = randomize_bn(TwoInputNeck()).eval()
    rep = mmreparam.reparameterize(model, 'OREPA')
    assert [c for c, _, _ in rep.reparam_report.converted] == ['lateral.conv', 'out.conv']
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ref, out = model(x, 0.5), evaluated(rep)(x, 0.5)
    assert ((ref - out).abs().max() / ref.abs().max()).item() <= 1e-5


def test_block_types_declare_what_they_replace():
    from mmreparam.models.layers import ACB, DBB, ConvBN, OREPA1x1, OREPALargeConv
    assert OREPA1x1.replacement_problem(nn.Conv2d(4, 4, 1, groups=2)) \
        == 'OREPA1x1 does not support groups > 1 (groups=2)'
    assert 'padding = dilation' in DBB.replacement_problem(nn.Conv2d(4, 4, 3, padding=0))
    assert DBB.replacement_problem(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4)) is None
    assert 'both axes' in ACB.replacement_problem(nn.Conv2d(4, 4, (1, 3), padding=(0, 1)))
    assert 'padding_mode' in ACB.replacement_problem(
        nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    assert 'odd kernel_size >= 5' in OREPALargeConv.replacement_problem(nn.Conv2d(4, 4, 3))
    assert ConvBN.replacement_problem(nn.Conv2d(4, 4, 2, stride=2)) is None


@pytest.mark.parametrize('reparam', ['QARepVGG', 'OREPA_VGG', 'base'])
def test_other_reparam_names(reparam):
    torch.manual_seed(0)
    model = randomize_bn(TimmStyle()).eval()
    x = torch.randn(1, 3, 16, 16)
    rep = mmreparam.reparameterize(model, reparam)
    assert len(rep.reparam_report.converted) == 2
    assert max_rel((model, x), (evaluated(rep), x)) <= 1e-5
    folded = mmreparam.fold(rep)
    fresh = TimmStyle().eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert max_rel((rep, x), (fresh, x)) <= 1e-5
