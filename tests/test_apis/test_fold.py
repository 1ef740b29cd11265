"""mmreparam.fold / fold_error on whole models, including other libraries' blocks."""
import copy

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
