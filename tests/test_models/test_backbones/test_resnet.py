"""mmreparam.ResNet: mmdet parity, every reparam folds exactly, freezing, stem lr_mult."""
import copy
import re

import pytest
import torch
import torch.nn as nn
from helpers import reparam_types
from torch.nn.modules.batchnorm import _BatchNorm

import mmreparam
from mmreparam.models.backbones import ResNet
from mmreparam.models.layers import (
    ACB,
    DBB,
    OREPA,
    ConvBN,
    OREPA1x1,
    OREPALargeConv,
    OREPAVGGBlock,
    RepVGGBlock,
)
from mmreparam.testing import randomize_bn, randomize_parameters

SMALL = dict(base_channels=8, init_cfg=None)


def small(depth=50, **kwargs):
    torch.manual_seed(0)
    model = ResNet(depth, **dict(SMALL, **kwargs))
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=1)
    return randomize_bn(model, seed=2).eval()


def mmdet_to_ours(state, norm='bn'):
    """Test-side key map of mmdet's (or mmseg's) ResNet (pytorch style, 7x7 stem) to
    reparam='base'; ``norm`` is mmcv's name of the norm (``bn``, ``gn``). Plugin keys
    (``layer2.0.context_block.*``) are the same in both."""
    out = {}
    for key, value in state.items():
        parts = key.split('.')
        if parts[0] in ('conv1', f'{norm}1'):
            out[f'stem.{"conv" if parts[0] == "conv1" else norm}.{parts[-1]}'] = value
            continue
        layer, unit, name = parts[0], parts[1], parts[2]
        if name == 'downsample':
            sub = 'conv' if parts[3] == '0' else norm
            out[f'{layer}.{unit}.downsample.0.{sub}.{parts[-1]}'] = value
        elif re.fullmatch(r'conv\d', name):
            out[f'{layer}.{unit}.{name}.conv.{".".join(parts[3:])}'] = value
        elif re.fullmatch(fr'{norm}\d', name):
            out[f'{layer}.{unit}.conv{name[len(norm):]}.{norm}.{parts[-1]}'] = value
        else:  # a plugin
            out[key] = value
    return out


@pytest.mark.parametrize('depth', [18, 50])
def test_base_deploy_equals_mmdet_resnet(depth):
    from mmdet.models.backbones import ResNet as DetResNet
    torch.manual_seed(0)
    det = randomize_bn(DetResNet(depth, base_channels=8, stem_channels=8), seed=3)
    det.eval()  # mmdet's train() returns None
    ours = ResNet(depth, reparam='base', **SMALL)
    ours.load_state_dict(mmdet_to_ours(det.state_dict()), strict=True)
    deploy = ResNet(depth, reparam='base', deploy=True, **SMALL)
    deploy.load_state_dict(mmreparam.fold(ours).state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det(x), deploy.eval()(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def block_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_official_per_kernel_size_rule():
    types = block_types(ResNet(50, reparam='OREPA', **SMALL))
    assert types['stem'] is OREPALargeConv
    assert types['layer1.0.conv1'] is OREPA1x1 and types['layer1.0.conv3'] is OREPA1x1
    assert types['layer1.0.conv2'] is OREPA
    assert types['layer1.0.downsample.0'] is OREPA1x1  # Bottleneck shortcut: OREPA1x1
    types = block_types(ResNet(18, reparam='OREPA', **SMALL))
    assert types['layer2.0.downsample.0'] is ConvBN  # BasicBlock shortcut stays plain
    for reparam, block in (('DBB', DBB), ('ACB', ACB), ('RepVGG', RepVGGBlock),
                           ('OREPA_VGG', OREPAVGGBlock)):
        types = block_types(ResNet(50, reparam=reparam, **SMALL))
        assert types['stem'] is ConvBN and types['layer1.0.conv1'] is ConvBN
        assert types['layer1.0.conv2'] is block
    types = block_types(ResNet(50, reparam='DBB', deep_stem=True, **SMALL))
    assert [types[f'stem.{i}'] for i in range(3)] == [DBB] * 3


@pytest.mark.parametrize('reparam', reparam_types())
@pytest.mark.parametrize('depth', [18, 50])
def test_every_reparam_folds_exactly(reparam, depth):
    model = small(depth, reparam=reparam).double()
    x = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, x)
    assert err['max_rel'] < 1e-10, err
    assert all(m.reparam_conv is not None for m in folded.modules()
               if isinstance(m, mmreparam.models.layers.ReparamBlock))
    deploy = ResNet(depth, reparam=reparam, deploy=True, **SMALL).double()
    deploy.load_state_dict(folded.state_dict(), strict=True)


def test_variants_run_and_fold():
    # ResNeXt, V1d (deep stem + avg_down), caffe style, dilation with contract_dilation.
    for kwargs in (dict(groups=4, base_width=16), dict(deep_stem=True, avg_down=True),
                   dict(style='caffe'),
                   dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True,
                        deep_stem=True)):
        model = small(50, reparam='OREPA', **kwargs)
        folded = mmreparam.fold(model)
        err = mmreparam.fold_error(model, folded, torch.randn(1, 3, 48, 48))
        assert err['max_rel'] < 1e-5, (kwargs, err)


def test_out_indices_and_shapes_match_mmdet():
    from mmdet.models.backbones import ResNet as DetResNet
    x = torch.randn(1, 3, 64, 64)
    for kwargs in (dict(out_indices=(1, 3)), dict(num_stages=3, out_indices=(0, 2),
                                                  strides=(1, 2, 2), dilations=(1, 1, 1))):
        ours = [o.shape for o in ResNet(50, base_channels=8, stem_channels=8, **kwargs)(x)]
        ref = [o.shape for o in DetResNet(50, base_channels=8, stem_channels=8, **kwargs)(x)]
        assert ours == ref


def test_frozen_stages_and_norm_eval():
    model = ResNet(50, frozen_stages=1, norm_eval=True, **SMALL).train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    model = ResNet(50, norm_eval=False, **SMALL).train()
    assert all(m.training for m in model.modules() if isinstance(m, _BatchNorm))


def test_with_cp_gives_the_same_gradients():
    model = small(18, reparam='DBB').train()
    cp_model = copy.deepcopy(model)
    cp_model.layer1[0].with_cp = True
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    for m in (model, cp_model):
        sum(o.sum() for o in m(x)).backward()
    for (n, a), b in zip(model.named_parameters(), cp_model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), n


@pytest.mark.parametrize('kwargs,match', [
    (dict(depth=42), 'depth'),
    (dict(depth=50, reparam='XYZ'), 'reparam'),
    (dict(depth=50, out_indices=(4, )), 'out_indices'),
    (dict(depth=50, conv_cfg=dict(type='ConvWS')), 'conv_cfg'),
    (dict(depth=18, style='tensorflow'), 'style'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


@pytest.mark.parametrize('reparam', reparam_types())
@pytest.mark.parametrize('deep_stem', [False, True])
def test_stem_lr_mult_reaches_every_stem_parameter_only(reparam, deep_stem):
    from mmengine.optim import build_optim_wrapper

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNet(18, reparam=reparam, deep_stem=deep_stem, **SMALL)
            self.head = nn.Conv2d(64, 2, 1)

    model = Detector()
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, momentum=0.9),
        paramwise_cfg=dict(custom_keys={'backbone.stem': dict(lr_mult=0.01)})))
    lr_of = {id(p): g['lr'] for g in wrapper.optimizer.param_groups for p in g['params']}
    stem = {id(p) for p in model.backbone.stem.parameters()}
    assert stem and len(lr_of) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        expected = 0.1 * 0.01 if id(param) in stem else 0.1
        assert abs(lr_of[id(param)] - expected) < 1e-12, name
    if reparam == 'OREPA' and not deep_stem:  # the generators of the linear stem
        assert any('weight2.weight_orepa_origin' in n for n, _ in
                   model.backbone.stem.named_parameters())


@pytest.mark.parametrize('depth', [18, 50])
def test_zero_init_residual_zeroes_the_last_bn_of_each_unit(depth):
    from torch.nn.modules.batchnorm import _BatchNorm
    model = ResNet(depth, base_channels=8, reparam='OREPA', zero_init_residual=True)
    model.init_weights()
    units = [unit for layer in model.stage_modules() for unit in layer]
    assert units
    for unit in units:
        last = [m for m in unit.last_conv.modules() if isinstance(m, _BatchNorm)]
        first = [m for m in unit.conv1.modules() if isinstance(m, _BatchNorm)]
        assert last and all((m.weight == 0).all() for m in last)
        assert all((m.weight != 0).any() for m in first)


def test_zero_init_residual_only_with_the_default_init():
    """As mmdet: a custom init_cfg is the user's; the residual BNs are not zeroed."""
    from torch.nn.modules.batchnorm import _BatchNorm
    model = ResNet(18, base_channels=8, reparam='OREPA', zero_init_residual=True,
                   init_cfg=[dict(type='Kaiming', layer='Conv2d'),
                             dict(type='Constant', val=1, layer='_BatchNorm')])
    model.init_weights()
    last = [m for layer in model.stage_modules() for unit in layer
            for m in unit.last_conv.modules() if isinstance(m, _BatchNorm)]
    assert last and all((m.weight == 1).all() for m in last)


def test_pretrained_must_be_a_path():
    with pytest.raises(TypeError, match='pretrained must be a checkpoint path'):
        ResNet(18, pretrained=dict(checkpoint='x.pth'))


@pytest.mark.parametrize('fallback', [False, True])
def test_mmdet_dcn_form_with_fallback_on_stride(fallback):
    dcn = dict(type='DCN', deform_groups=1, fallback_on_stride=fallback)
    model = ResNet(50, base_channels=8, reparam='OREPA', dcn=dcn,
                   stage_with_dcn=(False, True, True, True))
    conv2 = model.layer2[0].conv2
    if fallback:
        assert type(conv2).__name__ == 'OREPA'
    else:
        assert 'DeformConv' in type(conv2.conv).__name__ or any(
            'DeformConv' in type(m).__name__ for m in conv2.modules())
    assert dcn['fallback_on_stride'] is fallback  # the caller's dict is not changed
    model.init_weights()
    assert model(torch.randn(1, 3, 128, 128))[-1].shape == (1, 256, 4, 4)


# Plugins at every position (and stage selections), as mmdet's configs write them.
PLUGINS = [
    dict(cfg=dict(type='GeneralizedAttention', spatial_range=-1, num_heads=2,
                  attention_type='0010', kv_stride=2),
         stages=(False, True, False, False), position='after_conv1'),
    dict(cfg=dict(type='NonLocal2d'), stages=(False, False, True, False),
         position='after_conv2'),
    dict(cfg=dict(type='ContextBlock', ratio=1. / 4, postfix=1), position='after_conv3'),
    dict(cfg=dict(type='ContextBlock', ratio=1. / 4, postfix=2),
         stages=(True, False, False, True), position='after_conv3'),
]


def randomized(model, seed=1):
    """Random parameters everywhere (plugins start as identities: zero last convs) and
    random BN statistics."""
    randomize_parameters(model, ('weight', 'bias'), seed=seed, scale=0.2)
    randomize_bn(model, seed=seed + 1).eval()  # mmdet's train() returns None
    return model


def test_plugins_match_mmdet():
    from mmdet.models.backbones import ResNet as DetResNet
    torch.manual_seed(0)
    det = randomized(DetResNet(50, base_channels=8, plugins=PLUGINS))
    ours = ResNet(50, reparam='base', plugins=PLUGINS, **SMALL)
    ours.load_state_dict(mmdet_to_ours(det.state_dict()), strict=True)
    ours.eval()
    assert ours.layer2[0].gen_attention_block.in_channels == 16  # width after conv1
    assert ours.layer3[1].nonlocal_block.in_channels == 32
    assert ours.layer1[0].context_block1.in_channels == 32  # planes * 4 after conv3
    assert not hasattr(ours.layer2[0], 'context_block2')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det(x), ours(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('reparam', ['OREPA', 'DBB', 'base'])
def test_plugins_survive_fold_and_deploy(reparam):
    model = small(50, reparam=reparam, plugins=PLUGINS)
    randomize_parameters(model, ('conv_mask.weight', 'channel_add_conv.3.weight',
                                 'conv_out.conv.weight'), seed=3)
    x = torch.randn(1, 3, 48, 48)
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, x)
    assert err['max_rel'] < 1e-5, err
    assert isinstance(folded.layer1[0].context_block1, type(model.layer1[0].context_block1))
    deploy = ResNet(50, reparam=reparam, deploy=True, plugins=PLUGINS, **SMALL).eval()
    deploy.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(folded(x), deploy(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(depth=18, plugins=[dict(cfg=dict(type='ContextBlock', ratio=.25),
                                  position='after_conv2')]), ValueError, 'Bottleneck'),
    (dict(depth=50, plugins=[dict(cfg=dict(type='ContextBlock', ratio=.25),
                                  position='after_conv4')]), ValueError, 'position'),
    (dict(depth=50, plugins=[dict(cfg=dict(type='ContextBlock', ratio=.25),
                                  stages=(True, False), position='after_conv3')]),
     ValueError, 'one value per stage'),
    (dict(depth=50, plugins=[dict(cfg=dict(type='ContextBlock', ratio=.25),
                                  position='after_conv3')] * 2), ValueError, 'postfix'),
    (dict(depth=50, plugins=dict(cfg=dict(type='ContextBlock'), position='after_conv3')),
     ValueError, 'list'),
    (dict(depth=50, plugins=[dict(cfg=dict(type='NoSuchPlugin'), position='after_conv3')]),
     KeyError, 'NoSuchPlugin'),
])
def test_bad_plugins(kwargs, error, match):
    with pytest.raises(error, match=match):
        ResNet(base_channels=8, **kwargs)


def test_plugins_and_dcn_initialize_as_in_mmdet():
    """NonLocal2d zeroes its output conv and DCNv2 its offsets in their own init_weights();
    mmdet's ResNet reaches them, so must ours (else the Kaiming init would stay there)."""
    from mmdet.models.backbones import ResNet as DetResNet
    kwargs = dict(base_channels=8, plugins=[dict(cfg=dict(type='NonLocal2d'),
                                                 position='after_conv2')],
                  dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
                  stage_with_dcn=(False, True, False, False))
    det = DetResNet(50, **kwargs)
    ours = ResNet(50, reparam='OREPA', **kwargs)
    det.init_weights()
    ours.init_weights()
    det_offset = det.layer2[0].conv2.conv_offset.weight
    ours_offset = ours.layer2[0].conv2.conv.conv_offset.weight
    det_out = det.layer1[0].nonlocal_block.conv_out.conv.weight
    ours_out = ours.layer1[0].nonlocal_block.conv_out.conv.weight
    assert (det_offset == 0).all() and (det_out == 0).all()  # what mmdet does
    assert (ours_offset == 0).all() and (ours_out == 0).all()
    # NonLocal2d's normal_init(std=0.01) of its other convs, not the backbone's Kaiming
    # (std sqrt(2 / 32) = 0.25 here), is the last word in both.
    for model in (det, ours):
        assert model.layer1[0].nonlocal_block.g.conv.weight.std() < 0.02


def mmseg_multi_grid(**kwargs):
    from mmseg.models.backbones import ResNet as SegResNet
    torch.manual_seed(0)
    model = randomize_bn(SegResNet(50, base_channels=8, stem_channels=8, **kwargs), seed=3)
    model.eval()  # mmseg's train() returns None
    return model


@pytest.mark.parametrize('contract_dilation', [False, True])
def test_multi_grid_matches_mmseg(contract_dilation):
    kwargs = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), multi_grid=(1, 2, 4),
                  contract_dilation=contract_dilation)
    seg = mmseg_multi_grid(**kwargs)
    ours = ResNet(50, reparam='base', **SMALL, **kwargs)
    assert [unit.conv2.dilation for unit in ours.layer4] == [1, 2, 4]
    assert [unit.conv2.dilation[0] for unit in seg.layer4] == [1, 2, 4]
    first3 = 1 if contract_dilation else 2  # multi_grid is for the last stage only
    assert [unit.conv2.dilation for unit in ours.layer3] == [first3] + [2] * 5
    ours.load_state_dict(mmdet_to_ours(seg.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(seg(x), ours.eval()(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    folded = mmreparam.fold(small(50, reparam='OREPA', **kwargs))
    assert [unit.conv2.reparam_conv.dilation for unit in folded.layer4] == [(1, 1), (2, 2),
                                                                          (4, 4)]


def test_multi_grid_needs_one_dilation_per_unit():
    with pytest.raises(ValueError, match='multi_grid'):
        ResNet(50, multi_grid=(1, 2), **SMALL)
    with pytest.raises(ValueError, match='multi_grid'):  # 3 stages: layer3 has 6 units
        ResNet(50, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
               out_indices=(2, ), multi_grid=(1, 2, 4), **SMALL)


def test_conv_cfg_with_base_builds_every_conv_with_it():
    from mmcv.cnn.bricks.conv_ws import ConvWS2d
    from mmdet.models.backbones import ResNet as DetResNet
    torch.manual_seed(0)
    det = randomize_bn(DetResNet(50, base_channels=8, conv_cfg=dict(type='ConvWS')), seed=3)
    det.eval()
    ours = ResNet(50, reparam='base', conv_cfg=dict(type='ConvWS'), **SMALL)
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, ConvWS2d) for m in convs)
    ours.load_state_dict(mmdet_to_ours(det.state_dict()), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det(x), ours.eval()(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('conv_cfg', [None, dict(type='Conv2d'), dict(type='Conv')])
@pytest.mark.parametrize('reparam', ['base', 'OREPA', 'DBB'])
def test_plain_conv_cfg_keeps_the_reparam_blocks(conv_cfg, reparam):
    default = block_types(ResNet(50, reparam=reparam, **SMALL))
    assert block_types(ResNet(50, reparam=reparam, conv_cfg=conv_cfg, **SMALL)) == default


@pytest.mark.parametrize('conv_cfg', [dict(type='ConvWS'), dict(type='DCN'),
                                      dict(type='Conv2d', padding_mode='reflect')])
@pytest.mark.parametrize('reparam', ['OREPA', 'RepVGG'])
def test_reparam_blocks_refuse_other_conv_cfgs(conv_cfg, reparam):
    with pytest.raises(ValueError, match=r"conv_cfg=.*reparam=.*fold them into one"):
        ResNet(50, reparam=reparam, conv_cfg=conv_cfg, **SMALL)


def test_group_norm_with_base_matches_mmdet():
    from mmdet.models.backbones import ResNet as DetResNet
    gn = dict(type='GN', num_groups=4, requires_grad=True)
    torch.manual_seed(0)
    det = DetResNet(50, base_channels=8, norm_cfg=gn)
    randomize_parameters(det, ('weight', 'bias'), seed=1, scale=0.3)
    ours = ResNet(50, reparam='base', norm_cfg=gn, **SMALL)
    norms = [m for m in ours.modules() if isinstance(m, (nn.GroupNorm, _BatchNorm))]
    assert len(norms) == 53 and all(isinstance(m, nn.GroupNorm) for m in norms)
    ours.load_state_dict(mmdet_to_ours(det.state_dict(), norm='gn'), strict=True)
    x = torch.randn(1, 3, 64, 64)
    det.eval()
    with torch.no_grad():
        for a, b in zip(det(x), ours.eval()(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
        folded = mmreparam.fold(ours)  # nothing folds: GN has no conv equivalent
        for a, b in zip(ours(x), folded(x)):
            assert torch.equal(a, b)
    ours.init_weights()  # the default init: zero_init_residual zeroes the last GN
    assert all((unit.conv3.gn.weight == 0).all() for unit in ours.layer1)


@pytest.mark.parametrize('reparam', ['OREPA', 'DBB', 'RepVGG'])
def test_reparam_blocks_still_refuse_group_norm(reparam):
    with pytest.raises(TypeError, match='need a BatchNorm'):
        ResNet(50, reparam=reparam, norm_cfg=dict(type='GN', num_groups=4), **SMALL)


@pytest.mark.parametrize('init_cfg', [None, [dict(type='Kaiming', layer='Conv2d'),
                                             dict(type='Constant', val=1,
                                                  layer='_BatchNorm')]])
@pytest.mark.parametrize('zero_init_residual', [True, False])
def test_zero_init_residual_as_mmdet_decides(init_cfg, zero_init_residual):
    from mmdet.models.backbones import ResNet as DetResNet
    kwargs = dict(base_channels=8, zero_init_residual=zero_init_residual, init_cfg=init_cfg)
    det, ours = DetResNet(50, **kwargs), ResNet(50, reparam='base', **kwargs)
    det.init_weights()
    ours.init_weights()
    det_zeroed = [bool((unit.norm3.weight == 0).all()) for layer in det.res_layers
                  for unit in getattr(det, layer)]
    ours_zeroed = [bool((unit.conv3.bn.weight == 0).all()) for layer in ours.stage_modules()
                   for unit in layer]
    assert ours_zeroed == det_zeroed
    assert set(det_zeroed) == {zero_init_residual and init_cfg is None}


@pytest.mark.parametrize('reparam', ['base', 'DBB'])
def test_mmdet_checkpoint_with_plugins_loads_with_its_plugins(reparam):
    """A GCNet backbone trained with mmdet: its plugin weights load as they are, its
    convolutions are expanded into the re-param form, the outputs stay."""
    from mmdet.models.backbones import ResNet as DetResNet

    from mmreparam.checkpoint import load_pretrained
    plugins = [dict(cfg=dict(type='ContextBlock', ratio=1. / 4),
                    stages=(False, True, True, True), position='after_conv3')]
    torch.manual_seed(0)
    det = randomized(DetResNet(50, base_channels=8, plugins=plugins))
    ours = ResNet(50, reparam=reparam, plugins=plugins, **SMALL)
    load_pretrained(ours, {'state_dict': det.state_dict()})
    ours.eval()
    plugin_keys = [k for k in det.state_dict() if '.context_block.' in k]
    assert len(plugin_keys) == 13 * 8  # 13 units in stages 2-4, 8 tensors per GC block
    for key in plugin_keys:
        assert torch.equal(ours.state_dict()[key], det.state_dict()[key]), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det(x), ours(x)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
