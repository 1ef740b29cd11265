"""mmreparam.fold on other libraries' models: mmpretrain's and timm's own fold methods.

Each model is built from the installed library (smallest variants, small inputs), with
random BN statistics and affine parameters, in eval mode. Folded by ``mmreparam.fold`` it
must have the structure, the state and the outputs of the library's own fold (mmpretrain:
``switch_to_deploy()`` / ``merge_kernel()`` / ``local_inject()``; timm:
``timm.utils.reparameterize_model``), in float32 and float64; folding again changes nothing;
a model built in deploy form is left as it is.
"""
import copy
import sys

import pytest
import torch
import torch.nn as nn

import mmreparam
from mmreparam.errors import ForeignFoldError
from mmreparam.testing import default_dtype, randomize_bn

F64 = torch.float64

pytestmark = pytest.mark.usefixtures('single_thread')


@torch.no_grad()
def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random BN statistics and affine parameters, and random layer scales / gates (which
    start at constants), in eval mode."""
    randomize_bn(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if any(part in name for part in ('gamma', 'layer_scale', 'alpha', 'affine')):
            noise = torch.randn(param.shape, generator=gen, dtype=F64) * 0.5
            param.copy_(param + noise.to(param))
    model.eval()  # mmpretrain backbones' train() returns None: no chaining
    return model


def structure(model: nn.Module):
    """Class of every module (by name) and name, shape and dtype of every tensor."""
    return ([(name, type(m).__name__) for name, m in model.named_modules()],
            [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()])


def assert_same_state(a: nn.Module, b: nn.Module):
    assert structure(a) == structure(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_rel(a, b):
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    return diff / max(y.abs().max().item() for y in b)


# ------------------------------------------------------------------------------------------
# The models: name -> (build, the library's own fold (in place), input size)


def _mmpretrain(name, **kwargs):
    from mmpretrain.models import backbones
    return getattr(backbones, name)(**kwargs)


def _switch(model):
    model.switch_to_deploy()


def _each(method):
    def fold(model):
        for m in list(model.modules()):
            if hasattr(m, method):
                getattr(m, method)()
    return fold


def _levit_with_head():
    from mmpretrain.models.heads import LeViTClsHead
    from mmpretrain.models.necks import GlobalAveragePooling
    # (mmpretrain 1.2.0 refuses custom arch dicts: it checks for keys its zoo does not use)
    return nn.Sequential(_mmpretrain('LeViT', arch='128s', img_size=64, drop_path_rate=0.),
                         GlobalAveragePooling(),
                         LeViTClsHead(num_classes=5, in_channels=384, distillation=True))


def _levit_fold(model):
    model[0].switch_to_deploy()
    model[2].switch_to_deploy()


MMPRETRAIN = {
    'RepVGG': (lambda: _mmpretrain('RepVGG', arch=dict(
        num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4, group_layer_map=None, se_cfg=None),
        out_indices=(3, )), _switch, 32),
    'MobileOne': (lambda: _mmpretrain('MobileOne', arch=dict(
        num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4, num_conv_branches=[2, 2, 2, 2],
        num_se_blocks=[0, 0, 0, 1]), out_indices=(3, )), _switch, 32),
    'RepLKNet': (lambda: _mmpretrain('RepLKNet', arch=dict(
        large_kernel_sizes=[7, 7, 5, 3], layers=[1, 1, 1, 1], channels=[8, 16, 24, 32],
        small_kernel=3, dw_ratio=1), out_indices=(3, )), _switch, 64),
    'RepMLPNet': (lambda: _mmpretrain('RepMLPNet', arch=dict(
        channels=[8, 16, 32, 64], depths=[1, 1, 1, 1], sharesets_nums=[1, 2, 4, 8]),
        img_size=64, reparam_conv_kernels=(1, 3), out_indices=(3, )), _switch, 64),
    'RIFormer': (lambda: _mmpretrain('RIFormer', arch=dict(
        layers=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], mlp_ratios=[2, 2, 2, 2],
        layer_scale_init_value=1e-5), out_indices=(3, )), _switch, 32),
    'LeViT': (_levit_with_head, _levit_fold, 64),
    'ReparamLargeKernelConv': (lambda: __import__(
        'mmpretrain.models.backbones.replknet', fromlist=['x']).ReparamLargeKernelConv(
        8, 8, kernel_size=7, stride=1, groups=8, small_kernel=3), _each('merge_kernel'), 16),
    'RepMLPBlock': (lambda: __import__(
        'mmpretrain.models.backbones.repmlp', fromlist=['x']).RepMLPBlock(
        8, path_h=4, path_w=4, reparam_conv_kernels=(1, 3), globalperceptron_ratio=2,
        num_sharesets=2), _each('local_inject'), 8),
}

# timm's smallest variants; (kwargs for timm.create_model, input size)
TIMM = {
    'repvgg_a0': (dict(), 32),
    'mobileone_s0': (dict(), 32),
    'fastvit_t8': (dict(), 64),
    'repghostnet_050': (dict(), 32),
    'repvit_m0_9': (dict(), 64),
    'levit_128s': (dict(img_size=64), 64),
    'efficientvit_m0': (dict(img_size=64), 64),
    'tiny_vit_5m_224': (dict(), 64),
}
TIMM_SLOW = {
    'fastvit_sa12': (dict(), 64),
    'ghostnetv3_050': (dict(), 64),
    'lcnetv2_small': (dict(), 64),
    'nextvit_small': (dict(), 64),
    'shvit_s1': (dict(), 64),
    'iformer_t': (dict(), 64),
    'efficientvim_m1': (dict(), 64),
    'levit_conv_128s': (dict(img_size=64), 64),
}
DEFAULT_MMPRETRAIN = ('RepMLPNet', 'LeViT', 'RepMLPBlock')
DEFAULT_TIMM = ('fastvit_t8', 'repvit_m0_9', 'levit_128s')


def _timm_model(name):
    timm = pytest.importorskip('timm', reason='timm is not installed (requirements/tests.txt)')
    kwargs, size = {**TIMM, **TIMM_SLOW}[name]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kwargs), size


def _timm_fold(model):
    from timm.utils import reparameterize_model
    reparameterize_model(model, inplace=True)


def _params(names, default):
    return [name if name in default else pytest.param(name, marks=pytest.mark.slow)
            for name in names]


def check_against_library(build, library_fold, size, dtype):
    """mmreparam.fold of the model == the library's own fold: structure, state, outputs;
    a second fold changes nothing."""
    with default_dtype(dtype):
        torch.manual_seed(0)
        model = randomized(build(), seed=3)
        theirs = copy.deepcopy(model)
        library_fold(theirs)
    x = torch.randn(2, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if size <= 16:  # a block used on its own: channels of the block
        x = torch.randn(2, 8, size, size, dtype=dtype,
                        generator=torch.Generator().manual_seed(1))
    ours = mmreparam.fold(model)
    assert_same_state(ours, theirs)
    reference = outputs(model, x)
    assert max_rel(outputs(ours, x), reference) < (1e-10 if dtype == F64 else 1e-5)
    assert max_rel(outputs(theirs, x), outputs(ours, x)) == 0
    again = mmreparam.fold(ours)
    assert_same_state(again, ours)
    return model, ours


@pytest.mark.parametrize('dtype', [torch.float32, F64])
@pytest.mark.parametrize('name', _params(MMPRETRAIN, DEFAULT_MMPRETRAIN))
def test_mmpretrain_fold_is_the_library_fold(name, dtype):
    build, library_fold, size = MMPRETRAIN[name]
    check_against_library(build, library_fold, size, dtype)


@pytest.mark.parametrize('dtype', [torch.float32, F64])
@pytest.mark.parametrize('name', _params(list(TIMM) + list(TIMM_SLOW), DEFAULT_TIMM))
def test_timm_fold_is_the_library_fold(name, dtype):
    _, size = _timm_model(name)
    check_against_library(lambda: _timm_model(name)[0], _timm_fold, size, dtype)


def test_timm_fuse_modules_are_folded_not_skipped():
    """RepViT folds only through ``fuse()`` (which replaces the module): none is left."""
    model, _ = _timm_model('repvit_m0_9')
    folded = mmreparam.fold(randomized(model, 2))
    assert not [name for name, m in folded.named_modules()
                if callable(getattr(m, 'fuse', None)) and m is not folded]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


# ------------------------------------------------------------------------------------------
# Deploy-form models pass through unchanged


def _deploy_forms():
    timm = pytest.importorskip('timm', reason='timm is not installed (requirements/tests.txt)')
    arch = dict(channels=[8, 16, 32, 64], depths=[1, 1, 1, 1], sharesets_nums=[1, 2, 4, 8])
    return {
        'mmpretrain RepMLPNet(deploy=True)': _mmpretrain(
            'RepMLPNet', arch=arch, img_size=64, reparam_conv_kernels=(1, 3), deploy=True),
        'mmpretrain RepVGG(deploy=True)': _mmpretrain('RepVGG', arch=dict(
            num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4, group_layer_map=None,
            se_cfg=None), deploy=True),
        'timm fastvit_t8(inference_mode=True)': timm.create_model(
            'fastvit_t8', pretrained=False, num_classes=5, inference_mode=True),
        'timm repvgg_a0 reparameterized': timm.utils.reparameterize_model(
            timm.create_model('repvgg_a0', pretrained=False, num_classes=5)),
    }


def test_deploy_form_models_pass_through_unchanged(monkeypatch):
    logged = []
    monkeypatch.setattr(sys.modules['mmreparam.apis.fold'], 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs.get('level'))))
    for name, model in _deploy_forms().items():
        model = randomized(model, 4)
        x = torch.randn(1, 3, 64, 64)
        before = outputs(model, x)
        logged.clear()
        folded = mmreparam.fold(model)
        assert_same_state(folded, model)
        assert max_rel(outputs(folded, x), before) == 0, name
        assert logged == [(f'mmreparam.fold: folded 0 module(s) of {type(model).__name__}',
                           None)], name


def test_second_fold_of_foreign_models_does_not_raise():
    """Used to raise AttributeError from mmpretrain's RepMLPBlock.local_inject ('Identity'
    object has no attribute 'running_var') and timm's RepMixer.reparameterize ('RepMixer'
    object has no attribute 'mixer')."""
    for build in (MMPRETRAIN['RepMLPNet'][0], lambda: _timm_model('fastvit_t8')[0]):
        once = mmreparam.fold(randomized(build(), 5))
        assert_same_state(mmreparam.fold(mmreparam.fold(once)), once)


# ------------------------------------------------------------------------------------------
# What cannot be folded is said, with the module paths


class _Broken(nn.Module):
    """A foreign block whose own fold method fails half-way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x))

    def switch_to_deploy(self):
        del self.bn  # a change made before the failure must not survive it
        raise KeyError('no kernel for you')


def _with_broken():
    return nn.Sequential(nn.Sequential(_Broken()), mmreparam.models.layers.RepVGGBlock(2, 2),
                         _Broken())


def test_failing_foreign_fold_is_reported_and_left_as_it_was(monkeypatch):
    logged = []
    monkeypatch.setattr(sys.modules['mmreparam.apis.fold'], 'print_log',
                        lambda msg, **kwargs: logged.append((msg, kwargs.get('level'))))
    model = randomized(_with_broken(), 6)
    x = torch.randn(1, 2, 8, 8)
    folded = mmreparam.fold(model)
    assert max_rel(outputs(folded, x), outputs(model, x)) < 1e-5
    assert all(hasattr(m, 'bn') for m in folded.modules() if isinstance(m, _Broken))
    assert folded[1].folded  # the rest is folded
    warnings = [msg for msg, level in logged if level == 30]
    assert len(warnings) == 1
    assert ('2 module(s) of Sequential left unfolded' in warnings[0]
            and "_Broken.switch_to_deploy() raised KeyError: 'no kernel for you', at 2 "
            'module(s): 0.0, 2' in warnings[0]), warnings[0]


def test_strict_fold_raises_and_changes_nothing():
    model = randomized(_with_broken(), 6)
    before = copy.deepcopy(model.state_dict())
    for inplace in (False, True):
        with pytest.raises(ForeignFoldError, match=r"at 2 module\(s\): 0\.0, 2"):
            mmreparam.fold(model, inplace=inplace, strict=True)
    assert model.state_dict().keys() == before.keys()
    assert not model[1].folded  # nothing was folded in place either


def test_mmpretrain_tinyvit_fuse_that_raises_is_named():
    """mmpretrain 1.2.0's TinyViT ConvBN2d.fuse() reads ``self.c``, which it does not have:
    reported by path with the foreign error, never a bare traceback."""
    model = randomized(_mmpretrain('TinyViT', arch=dict(
        channels=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1]),
        img_size=(32, 32), window_size=[2, 2, 2, 1], drop_path_rate=0., out_indices=(3, )), 7)
    with pytest.raises(ForeignFoldError) as info:
        mmreparam.fold(model, strict=True)
    message = str(info.value)
    assert "ConvBN2d.fuse() raised AttributeError: 'ConvBN2d' object has no attribute 'c'" \
        in message and 'patch_embed.seq.0' in message, message
    x = torch.randn(1, 3, 32, 32)
    folded = mmreparam.fold(model)  # not strict: a warning, the model computes the same
    assert max_rel(outputs(folded, x), outputs(model, x)) == 0


def test_fold_of_none_says_what_happened():
    """``fold(backbone.eval())``: mmpretrain backbones' train() override returns None."""
    backbone = MMPRETRAIN['RepVGG'][0]()
    assert backbone.eval() is None
    with pytest.raises(TypeError, match=r"got NoneType: mmpretrain backbones' train\(\)"):
        mmreparam.fold(backbone.eval())
    with pytest.raises(TypeError, match='needs an nn.Module, got dict$'):
        mmreparam.fold({})


def test_only_argument_free_fold_methods_are_called():
    """mmdet's FPG neck has ``fuse(self, fuse_dict)``; a submodule may be named ``fuse``:
    neither is a fold method."""

    class WithArgument(nn.Module):
        def fuse(self, fuse_dict):
            raise AssertionError('called')

    class WithSubmodule(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = nn.Conv2d(2, 2, 1)

    model = nn.Sequential(WithArgument(), WithSubmodule())
    folded = mmreparam.fold(model, strict=True)
    assert_same_state(folded, model)
    assert isinstance(folded[1].fuse, nn.Conv2d)
