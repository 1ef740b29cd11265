"""mmreparam.fold / fold_error on whole models, including other libraries' blocks."""
import copy

import pytest
import torch
import torch.nn as nn

import mmreparam
from mmreparam.models.layers import DBB, OREPA, OREPALargeConv, RepVGGBlock
from mmreparam.testing import randomize_bn, randomize_parameters


def mixed_model():
    from mmpretrain.models.backbones import RepVGG as MMPretrainRepVGG
    torch.manual_seed(0)
    tiny = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25],
                group_layer_map=None, se_cfg=None)
    model = nn.Sequential(
        OREPALargeConv(3, 8, 5, stride=1),
        nn.ReLU(),
        DBB(8, 8, 3),
        OREPA(8, 3, 3),
        MMPretrainRepVGG(arch=tiny, out_indices=(3, )),
    )
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=1)
    return randomize_bn(model, seed=2).eval()


def test_fold_mixes_our_blocks_and_mmpretrain_repvgg():
    model = mixed_model()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    folded = mmreparam.fold(model)
    # The source model is untouched (a deep copy was folded).
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Ours are folded ...
    assert all(m.reparam_conv is not None for m in folded.modules()
               if isinstance(m, mmreparam.models.layers.ReparamBlock))
    # ... and mmpretrain's blocks too.
    blocks = [m for m in folded[4].modules() if type(m).__name__ == 'RepVGGBlock']
    assert blocks and all(b.deploy and not hasattr(b, 'branch_3x3') for b in blocks)
    err = mmreparam.fold_error(model, folded, x)
    assert err['max_rel'] < 1e-5, err
    assert not folded.training  # the mode of the source (eval) is kept


def test_fold_refuses_mmpretrain_se_blocks_whose_own_fold_drops_the_se():
    from mmpretrain.models.backbones import RepVGG as MMPretrainRepVGG
    torch.manual_seed(0)
    tiny_se = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25],
                   group_layer_map=None, se_cfg=dict(ratio=4, divisor=1))
    model = randomize_bn(MMPretrainRepVGG(arch=tiny_se, out_indices=(3, )), seed=2)
    model.eval()  # mmpretrain's train() override returns None, so no chaining
    x = torch.randn(2, 3, 32, 32)
    # what mmpretrain's own switch_to_deploy does to it: not the same function
    theirs = copy.deepcopy(model)
    theirs.switch_to_deploy()
    assert mmreparam.fold_error(model, theirs, x)['max_rel'] > 1e-2
    before = copy.deepcopy(model.state_dict())
    for inplace in (False, True):
        with pytest.raises(ValueError, match='RepVGGBlock with se_cfg cannot be folded'):
            mmreparam.fold(model, inplace=inplace)
    # nothing was folded, not even in place
    assert all(not m.deploy for m in model.modules() if type(m).__name__ == 'RepVGGBlock')
    assert model.state_dict().keys() == before.keys()


def test_fold_inplace_and_mode_restored():
    model = nn.Sequential(RepVGGBlock(4, 4), nn.BatchNorm2d(4)).train()
    out = mmreparam.fold(model, inplace=True)
    assert out is model and model[0].reparam_conv is not None
    assert model.training and model[1].training
    assert mmreparam.fold(model, inplace=True) is model  # idempotent


def test_fold_calls_foreign_reparameterize():

    class TimmStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def reparameterize(self):
            self.calls += 1

    model = nn.Sequential(TimmStyle(), nn.Sequential(TimmStyle()))
    folded = mmreparam.fold(model, inplace=True)
    assert folded[0].calls == 1 and folded[1][0].calls == 1


def test_fold_error_reports_differences():
    a = nn.Conv2d(2, 2, 1)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bias.add_(0.5)
    x = torch.randn(1, 2, 4, 4)
    err = mmreparam.fold_error(a, b, x)
    assert abs(err['max_abs'] - 0.5) < 1e-6
    assert err['max_rel'] == err['max_abs'] / a(x).abs().max().item()
    assert mmreparam.fold_error(a, a, x)['max_abs'] == 0


def test_fold_error_runs_without_tf32_and_restores_the_flags():
    """TF32 (on by default for CUDA convolutions) would hide the fold's error under its own."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32,
                         torch.backends.cuda.matmul.allow_tf32))
            return x * 2

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        mmreparam.fold_error(Probe(), Probe(), torch.ones(2))
        assert seen == [(False, False), (False, False)]
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class _Fixed(nn.Module):
    """Returns a fixed output structure, whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_fold_error_compares_empty_and_mixed_outputs():
    """A barely trained detector's tensor outputs may be empty: compared by shape, no
    error; integer and bool tensors by equality; NaN against NaN is equal."""
    empty = (torch.zeros(0, 4), torch.zeros(0, 81))
    err = mmreparam.fold_error(_Fixed(empty), _Fixed(empty), torch.zeros(1))
    assert err == dict(max_abs=0.0, max_rel=0.0, tensors=2, compared=0, mismatches=[])

    ref = dict(boxes=torch.zeros(0, 4), labels=torch.tensor([1, 2]),
               keep=torch.tensor([True, False]),
               scores=torch.tensor([1.0, float('nan'), float('inf'), -4.0]))
    same = copy.deepcopy(ref)
    err = mmreparam.fold_error(_Fixed(ref), _Fixed(same), torch.zeros(1))
    assert err['max_abs'] == 0 and err['compared'] == 3 and err['tensors'] == 4

    off = copy.deepcopy(ref)
    off['scores'][3] = -3.0
    err = mmreparam.fold_error(_Fixed(ref), _Fixed(off), torch.zeros(1))
    assert err['max_abs'] == 1.0 and err['max_rel'] == 0.25  # scale: largest finite |ref|
    off = copy.deepcopy(ref)
    off['labels'][0] = 7
    assert mmreparam.fold_error(_Fixed(ref), _Fixed(off), torch.zeros(1))['max_abs'] == 1.0
    off = copy.deepcopy(ref)
    off['scores'][0] = float('nan')
    assert mmreparam.fold_error(_Fixed(ref), _Fixed(off), torch.zeros(1))['max_abs'] == \
        float('inf')


def test_fold_error_reports_outputs_that_do_not_correspond():
    a = _Fixed((torch.zeros(3, 4), torch.ones(2)))
    for other, message in ((_Fixed((torch.zeros(2, 4), torch.ones(2))), 'shape (3, 4) vs (2, 4)'),
                           (_Fixed((torch.zeros(3, 4), )), '2 output tensors before')):
        err = mmreparam.fold_error(a, other, torch.zeros(1))
        assert err['max_abs'] == err['max_rel'] == float('inf')
        assert any(message in m for m in err['mismatches']), err


def test_fold_error_without_tensors_says_so():
    with pytest.raises(ValueError, match='no tensor to compare'):
        mmreparam.fold_error(_Fixed(dict(a='text')), _Fixed(dict(a='text')), torch.zeros(1))
