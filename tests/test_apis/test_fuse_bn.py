"""fold(..., fuse_bn=True): conv -> BN pairs found by following the data, fused exactly."""
import copy
import importlib
import logging

import pytest
import torch
import torch.nn as nn
from mmengine.registry import MODELS as ROOT_MODELS

import mmreparam
from mmreparam.apis.fuse_pairs import fuse_conv_bn_pairs, fused_structure
from mmreparam.apis.pairs import search_pairs
from mmreparam.errors import ForeignFoldError
from mmreparam.testing import randomize_bn

fold_module = importlib.import_module('mmreparam.apis.fold')
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def plain_cnn():
    """A torchvision-like plain CNN: conv -> BN -> ReLU stacks, a biased conv, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


class TwiceUsed(nn.Module):
    """``conv``'s output goes into ``bn`` and into a residual sum: not fusible."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(self.stem(x))
        return self.bn(y) + y


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


def flat(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def count_bn(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('which', ['plain', 'mmdet-resnet18'])
def test_fuse_bn_exact(which, dtype):
    torch.manual_seed(0)
    if which == 'plain':
        model = plain_cnn()
    else:
        model = ROOT_MODELS.build(dict(type='mmdet.ResNet', depth=18, base_channels=8,
                                       norm_eval=False))
    model.eval()  # mmdet's backbones' train() returns None
    model = randomize_bn(model, seed=3).to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    bns = count_bn(model)
    fused = mmreparam.fold(model, fuse_bn=True, example_inputs=x)
    assert count_bn(model) == bns  # not inplace: the input is unchanged
    assert count_bn(fused) == 0  # every BN of these models follows a conv used once
    assert not any(k.endswith('running_mean') for k in fused.state_dict())
    with torch.no_grad():
        for a, b in zip(flat(model(x)), flat(fused(x))):
            assert rel(a, b) < TOLERANCE[dtype]
    # fusing again finds no pair and changes nothing
    again = mmreparam.fold(fused, fuse_bn=True, example_inputs=x)
    assert str(again) == str(fused)
    state, state_again = fused.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_fuse_bn_default_off_and_example_input_from_structure():
    model = randomize_bn(plain_cnn(), seed=1).eval()
    assert count_bn(mmreparam.fold(model)) == 3  # off by default
    fused = mmreparam.fold(model, fuse_bn=True)  # an image from the first conv's channels
    assert count_bn(fused) == 0
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert rel(model(x), fused(x)) < 1e-5


def test_conv_output_used_twice_is_named_and_strict_raises(monkeypatch):
    logged = []
    monkeypatch.setattr(fold_module, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs.get('level'))))
    model = randomize_bn(TwiceUsed(), seed=2).eval()
    x = torch.randn(1, 3, 8, 8)
    fused = mmreparam.fold(model, fuse_bn=True, example_inputs=x)
    assert isinstance(fused.stem[1], nn.Identity)  # the stem's pair is fused
    assert isinstance(fused.bn, nn.BatchNorm2d)  # conv's output is used twice: left
    with torch.no_grad():
        assert rel(model(x), fused(x)) < 1e-5
    warnings = [msg for msg, level in logged if level == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert '1 BN pair(s) of TwiceUsed left unfused: conv -> bn (the conv\'s output ' \
        'is used elsewhere too' in warnings[0], warnings[0]
    logged.clear()
    mmreparam.fold(model, fuse_bn=False)  # without fuse_bn there is nothing to report
    assert not [msg for msg, level in logged if level == logging.WARNING]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ForeignFoldError, match=r'1 BN pair\(s\) of TwiceUsed cannot '
                       r'be fused: conv -> bn \(the conv\'s output is used elsewhere'):
        mmreparam.fold(model, inplace=True, strict=True, fuse_bn=True, example_inputs=x)
    assert isinstance(model.stem[1], nn.BatchNorm2d)  # nothing changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fuse_bn_after_reparameterize_and_a_train_mode_model():
    """Blocks are folded first, then the conv -> BN pairs they become are fused; train/eval
    flags are restored."""
    model = ROOT_MODELS.build(dict(type='mmdet.ResNet', depth=18, base_channels=8,
                                   norm_eval=False))
    model.eval()  # mmdet's backbones' train() returns None
    model = randomize_bn(mmreparam.reparameterize(randomize_bn(model), 'RepVGG'), 4)
    model.train()
    x = torch.randn(1, 3, 32, 32)
    fused = mmreparam.fold(model, fuse_bn=True, example_inputs=x)
    assert fused.training and count_bn(fused) == 0
    model.eval()
    fused.eval()
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert rel(a, b) < 1e-5


class BNBothSides(nn.Module):
    """BN -> 1x1 grouped conv, BN -> padded conv (not fusible: padding), linear -> BN1d,
    BN1d -> linear, and a 3-d BN1d input before a linear layer of as many features (not
    fusible)."""

    def __init__(self):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 6, 1, groups=2)  # BN before it: fused
        self.act = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)  # padded: BN left
        self.fc1 = nn.Linear(6, 8, bias=False)
        self.bn2 = nn.BatchNorm1d(8)  # after fc1: fused into it
        self.bn3 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 5)  # BN before it: fused
        self.bn4 = nn.BatchNorm1d(5)  # on (N, 5, 5): normalizes dim 1, fc3 acts on dim 2
        self.fc3 = nn.Linear(5, 2)  # so not fusible though the sizes agree

    def forward(self, x):
        y = self.conv2(self.bn1(self.act(self.conv1(self.bn0(x)))))
        z = self.bn2(self.fc1(y.mean((2, 3))))
        z = self.fc2(self.bn3(torch.relu(z)))
        return self.fc3(self.bn4(z[:, None].expand(-1, 5, -1)))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fuse_bn_before_and_around_linear_layers(dtype, monkeypatch):
    logged = []
    monkeypatch.setattr(fold_module, 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs.get('level'))))
    torch.manual_seed(0)
    model = randomize_bn(BNBothSides(), seed=5).to(dtype).eval()
    x = torch.randn(3, 4, 7, 7, dtype=dtype)
    fused = mmreparam.fold(model, fuse_bn=True, example_inputs=x)
    kept = {name for name, m in fused.named_modules() if isinstance(m, nn.BatchNorm1d)
            or isinstance(m, nn.BatchNorm2d)}
    assert kept == {'bn1', 'bn4'}, kept
    with torch.no_grad():
        assert rel(model(x), fused(x)) < TOLERANCE[dtype]
    warnings = [msg for msg, level in logged if level == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert '2 BN pair(s) of BNBothSides left unfused: bn1 -> conv2 (the conv pads its input' \
        in warnings[0] and 'bn4 -> fc3 (the BatchNorm normalizes a 3-d tensor' in warnings[0], \
        warnings[0]
    again = mmreparam.fold(fused, fuse_bn=True, example_inputs=x)
    state, state_again = fused.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)


def test_fused_structure_loads_the_fused_state_dict():
    model = randomize_bn(BNBothSides(), seed=6).eval()
    x = torch.randn(2, 4, 5, 5)
    pairs, _ = search_pairs(model, (x, ), more=True)
    fused_model = copy.deepcopy(model)
    fused = fuse_conv_bn_pairs(fused_model, pairs)
    assert {p.kind for p in fused} == {'bn-conv', 'linear-bn', 'bn-linear'}
    built = fused_structure(BNBothSides(), [[p.conv, p.norm] for p in fused]).eval()
    built.load_state_dict(fused_model.state_dict())  # strict
    with torch.no_grad():
        assert rel(model(x), built(x)) < 1e-5
    with pytest.raises(ValueError, match='has no fused pair'):
        fused_structure(BNBothSides(), [['conv9', 'bn0']])
