"""mmreparam.expand: a plain, folded or other re-param network into a chosen re-param form,
function-preserving (eval mode, float64, randomized BN statistics)."""
import copy

import pytest
import torch
from helpers import reparam_types, torchvision_features

import mmreparam
from mmreparam.checkpoint import CheckpointError
from mmreparam.testing import randomize_bn, randomize_parameters

F64 = torch.float64
TOL = 1e-10
#: Every block type with branches to expand into; not 'base': its ConvBN is the plain conv
#: and BN themselves, loaded as they are (no block is expanded, no branch is switched off).
EXPANDING = [reparam for reparam in reparam_types() if reparam != 'base']


def features(model, x):
    with torch.no_grad():
        return list(model(x))


def max_rel_error(outputs, reference):
    return max(((o - r).abs().max() / r.abs().max()).item()
               for o, r in zip(outputs, reference))


def backbone(reparam, **kwargs):
    model = mmreparam.ResNet(depth=18, reparam=reparam, out_indices=(0, 1, 2, 3), **kwargs)
    return model.to(F64).eval()


@pytest.fixture(scope='module')
def torchvision_r18():
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18().to(F64), seed=1).eval()


@pytest.mark.parametrize('reparam', EXPANDING)
def test_torchvision_resnet_expands_exactly(torchvision_r18, reparam):
    x = torch.randn(1, 3, 48, 48, dtype=F64, generator=torch.Generator().manual_seed(2))
    model = backbone(reparam)
    report = mmreparam.expand(model, torchvision_r18)
    assert report.converted_blocks and not report.missing
    assert max_rel_error(features(model, x), torchvision_features(torchvision_r18, x)) <= TOL
    # Every branch stays trainable: a training step moves the switched-off branches too.
    model.train()
    model(x)[-1].square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None]
    assert not dead, dead


def test_folded_model_expands_into_another_form():
    x = torch.randn(1, 3, 40, 40, dtype=F64, generator=torch.Generator().manual_seed(3))
    dbb = backbone('DBB', base_channels=16, stem_channels=32)
    randomize_parameters(dbb, ('', ), seed=4)
    randomize_bn(dbb, seed=5)
    folded = mmreparam.fold(dbb)
    reference = features(dbb, x)
    for reparam in ('OREPA', 'QARepVGG', 'base'):
        model = backbone(reparam, base_channels=16, stem_channels=32)
        mmreparam.expand(model, folded)
        assert max_rel_error(features(model, x), reference) <= TOL, reparam


def test_strict_expand_refuses_a_partial_fit_and_changes_nothing(torchvision_r18):
    model = mmreparam.ResNet(depth=34, reparam='OREPA').to(F64)  # deeper than the source
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match='not exact|does not fit'):
        mmreparam.expand(model, torchvision_r18)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
