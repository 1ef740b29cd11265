"""The upstream deploy pair: mmreparam's folded backbones as mmdet / mmseg / mmpretrain
classes, loaded strictly, with the folded model's outputs; mmreparam's form where there is
no upstream class."""
import copy

import pytest
import torch
from helpers import reparam_types
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmreparam
from mmreparam.apis.deploy import deploy_pair, models_registry
from mmreparam.apis.upstream import NoUpstreamForm, upstream_deploy
from mmreparam.testing import randomize_bn, randomize_parameters

REPARAMS = reparam_types()


def build(scope, node):
    with DefaultScope.overwrite_default_scope(scope):
        return models_registry(scope).build(copy.deepcopy(node))


def evaluated(model):
    model.eval()  # (mmdet's ResNet.train() returns None)
    return model


def trained(scope, node, seed=0):
    """mmreparam's part as after training: random branch scales and BN statistics."""
    torch.manual_seed(seed)
    model = build(scope, node)
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=seed + 1)
    return randomize_bn(model, seed=seed + 2).eval()


def relative_error(a, b):
    a = a if isinstance(a, (list, tuple)) else (a, )
    b = b if isinstance(b, (list, tuple)) else (b, )
    assert len(a) == len(b)
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


def check_upstream_pair(scope, node, upstream_type, size=64):
    """Fold, convert, build the upstream part from the written config, load strictly and
    compare with the folded part in float32 (<= 1e-5) and float64 (<= 1e-10)."""
    model = trained(scope, node)
    cfg = Config(dict(default_scope=scope, model=node))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        folded = mmreparam.fold(copy.deepcopy(model).to(dtype))
        pair = upstream_deploy(cfg, folded)
        assert pair.config.model.type == upstream_type, pair.parts
        assert 'mmreparam' not in pair.config.pretty_text
        assert all(v.dtype == dtype for v in pair.state_dict.values() if v.is_floating_point())
        upstream = evaluated(build(scope, pair.config.model).to(dtype))
        upstream.load_state_dict(pair.state_dict, strict=True)
        x = torch.randn(2, node.get('in_channels', 3), size, size, dtype=dtype)
        with torch.no_grad():
            err = relative_error(folded(x), upstream(x))
        assert err <= tolerance, (dtype, err)
    return pair


@pytest.mark.parametrize('reparam', REPARAMS)
def test_every_reparam_deploys_as_mmdet_resnet(reparam):
    node = dict(type='mmreparam.ResNet', depth=18, reparam=reparam, base_channels=8,
                init_cfg=None)
    pair = check_upstream_pair('mmdet', node, 'ResNet')
    assert pair.parts == ['model: mmreparam.ResNet -> mmdet.ResNet']
    # The bias of a folded block is carried by an identity-plus-bias BN.
    state = pair.state_dict
    assert torch.equal(state['bn1.running_mean'], torch.zeros(8))
    assert torch.equal(state['bn1.weight'], torch.ones(8))
    assert torch.equal(state['bn1.running_var'], torch.full((8, ), 1 - 1e-5, dtype=torch.float64))


#: Two stages of a ResNet-50 (enough for the stem, a stride-2 shortcut and avg_down).
TWO_STAGES = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))


@pytest.mark.parametrize('stages', [
    TWO_STAGES, pytest.param(dict(), marks=pytest.mark.slow)])
def test_bottleneck_resnet50_as_mmdet_v1d_and_mmpretrain(stages):
    node = dict(type='mmreparam.ResNet', depth=50, reparam='OREPA', base_channels=8,
                deep_stem=True, avg_down=True, init_cfg=None, **stages)
    pair = check_upstream_pair('mmdet', node, 'ResNetV1d')
    assert 'deep_stem' not in pair.config.model and 'stem.0.weight' in pair.state_dict
    pair = check_upstream_pair('mmpretrain', node, 'ResNetV1d')
    assert 'stem.0.conv.weight' in pair.state_dict  # mmpretrain's ConvModule stem
    # ours, not mmpretrain's default (3, )
    assert tuple(pair.config.model.out_indices) == stages.get('out_indices', (0, 1, 2, 3))


THREE_STAGES = dict(num_stages=3, strides=(1, 2, 1), dilations=(1, 1, 2), out_indices=(1, 2))


@pytest.mark.parametrize('scope,kwargs,upstream_type', [
    ('mmdet', dict(deep_stem=True, reparam='ACB', **TWO_STAGES), 'ResNet'),  # no V1c there
    ('mmdet', dict(avg_down=True, style='caffe', reparam='DBB', **TWO_STAGES), 'ResNet'),
    ('mmdet', dict(reparam='RepVGG', **THREE_STAGES), 'ResNet'),
    ('mmseg', dict(deep_stem=True, contract_dilation=True, multi_grid=(1, 2, 4, 1, 2, 4),
                   **THREE_STAGES), 'ResNetV1c'),
    ('mmseg', dict(deep_stem=True, avg_down=True, reparam='ACB', **TWO_STAGES), 'ResNetV1d'),
    ('mmseg', dict(reparam='base', **TWO_STAGES), 'ResNet'),
    ('mmpretrain', dict(deep_stem=True, frozen_stages=1, reparam='OREPA_VGG',
                        **dict(TWO_STAGES, out_indices=(1, ))), 'ResNetV1c'),
])
def test_resnet_variants(scope, kwargs, upstream_type):
    node = dict(dict(type='mmreparam.ResNet', depth=50, reparam='OREPA', base_channels=8,
                     init_cfg=None), **kwargs)
    written = check_upstream_pair(scope, node, upstream_type).config.model
    for key, value in kwargs.items():
        if key == 'reparam':
            assert key not in written
        elif key in ('deep_stem', 'avg_down') and upstream_type != 'ResNet':
            assert key not in written  # the class fixes them
        else:
            assert as_tuple(written[key]) == as_tuple(value), key


def as_tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def test_basicblock_resnet_as_mmpretrain():
    node = dict(type='mmreparam.ResNet', depth=18, reparam='ACB', base_channels=8,
                num_stages=3, out_indices=(2, ), strides=(1, 2, 2), dilations=(1, 1, 1),
                init_cfg=None)
    pair = check_upstream_pair('mmpretrain', node, 'ResNet')
    assert pair.config.model.stem_channels == 8  # mmpretrain's default is 64


def test_plugins_move_to_mmdet():
    plugins = [dict(cfg=dict(type='ContextBlock', ratio=1. / 4), position='after_conv3',
                    stages=(False, True, True)),
               dict(cfg=dict(type='GeneralizedAttention', spatial_range=-1, num_heads=2,
                             attention_type='0010', kv_stride=2),
                    stages=(False, False, True), position='after_conv2')]
    node = dict(type='mmreparam.ResNet', depth=50, reparam='OREPA', base_channels=8,
                init_cfg=None, plugins=plugins, **THREE_STAGES)
    model = trained('mmdet', node)
    randomize_parameters(model, ('conv_mask.weight', 'channel_add_conv.3.weight'), seed=5)
    cfg = Config(dict(default_scope='mmdet', model=node))
    folded = mmreparam.fold(model)
    pair = upstream_deploy(cfg, folded)
    assert any(k.startswith('layer2.0.context_block.') for k in pair.state_dict)
    upstream = evaluated(build('mmdet', pair.config.model))
    upstream.load_state_dict(pair.state_dict, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(folded(x), upstream(x)) <= 1e-5


def test_dcn_stages_move_to_mmdet():
    pytest.importorskip('mmcv.ops')
    node = dict(type='mmreparam.ResNet', depth=50, reparam='OREPA', base_channels=8,
                init_cfg=None, dcn=dict(type='DCN', deform_groups=1,
                                        fallback_on_stride=False),
                stage_with_dcn=(False, True, False, True))
    model = trained('mmdet', node)
    randomize_parameters(model, ('conv_offset.weight', ), seed=7, scale=0.1)
    cfg = Config(dict(default_scope='mmdet', model=node))
    folded = mmreparam.fold(model)
    pair = upstream_deploy(cfg, folded)
    assert 'layer2.0.conv2.conv_offset.weight' in pair.state_dict
    upstream = evaluated(build('mmdet', pair.config.model))
    upstream.load_state_dict(pair.state_dict, strict=True)
    x = torch.randn(1, 3, 96, 96)  # DCN needs 3x3 maps at stride 32
    with torch.no_grad():
        assert relative_error(folded(x), upstream(x)) <= 1e-5


def test_resnext_as_mmdet_resnext():
    # mmdet's ResNeXt width is planes * base_width / base_channels * groups, ours uses 64
    # for base_channels: the same widths at base_channels=64.
    node = dict(type='mmreparam.ResNet', depth=50, reparam='ACB', groups=4, base_width=8,
                num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1),
                init_cfg=None)
    pair = check_upstream_pair('mmdet', node, 'ResNeXt')
    assert pair.config.model.groups == 4 and pair.config.model.base_width == 8
    narrow = dict(node, base_channels=16)
    cfg = Config(dict(default_scope='mmdet', model=narrow))
    with pytest.raises(NoUpstreamForm, match='shape'):
        upstream_deploy(cfg, mmreparam.fold(trained('mmdet', narrow)))


@pytest.mark.parametrize('reparam', ['RepVGG', 'OREPA_VGG'])
@pytest.mark.parametrize('arch,kwargs', [
    ('A0', dict(base_channels=16)),
    (dict(num_blocks=[1, 2, 1, 1], width_factor=[1, 1, 1, 2], group_layer_map={2: 2},
          stem_channels=8), dict(base_channels=16, out_indices=(-2, -1), add_ppf=True)),
])
def test_repvgg_deploys_as_mmpretrain_repvgg(reparam, arch, kwargs):
    node = dict(type='mmreparam.RepVGG', arch=arch, reparam=reparam, **kwargs)
    pair = check_upstream_pair('mmpretrain', node, 'RepVGG')
    assert pair.config.model.deploy is True
    assert any('branch_reparam' in k for k in pair.state_dict)
    if isinstance(arch, str):
        assert pair.config.model.arch == arch


def test_repvgg_with_se_keeps_mmreparams_form():
    node = dict(type='mmreparam.RepVGG', arch=dict(num_blocks=[1, 1, 1, 1],
                                                   width_factor=[1, 1, 1, 1], use_se=True),
                base_channels=16)
    cfg = Config(dict(default_scope='mmpretrain', model=node))
    folded = mmreparam.fold(trained('mmpretrain', node))
    with pytest.raises(NoUpstreamForm, match='SE'):
        upstream_deploy(cfg, folded)
    pair = deploy_pair(folded, cfg)
    assert pair['form'] == 'mmreparam' and 'SE' in pair['why']
    assert pair['config'].model.type == 'mmreparam.RepVGG' and pair['config'].model.deploy


@pytest.mark.parametrize('scope,node,match', [
    ('mmpretrain', dict(type='mmreparam.ResNet', depth=50, base_channels=8,
                        dcn=dict(type='DCN', deform_groups=1),
                        stage_with_dcn=(False, False, False, True)), 'no argument dcn'),
    ('mmdet', dict(type='mmreparam.ResNet', depth=50, base_channels=8, dilations=(1, 1, 1, 2),
                   multi_grid=(1, 2, 4)), 'no argument multi_grid'),
    ('mmpretrain', dict(type='mmreparam.RepMLPResNet', arch='light', base_channels=8),
     'has no upstream class'),
    # mmdet's / mmseg's BasicBlock does not dilate its second conv; ours does
    ('mmseg', dict(type='mmreparam.ResNet', depth=18, base_channels=8, strides=(1, 2, 1, 1),
                   dilations=(1, 1, 2, 4)),
     r'another conv at layer3.0.conv2 \(padding .*, dilation \(2, 2\) here, \(1, 1\) upstream'),
])
def test_parts_without_an_upstream_class(scope, node, match):
    if 'dcn' in node:
        pytest.importorskip('mmcv.ops')
    cfg = Config(dict(default_scope=scope, model=node))
    folded = mmreparam.fold(build(scope, node).eval())
    with pytest.raises(NoUpstreamForm, match=match):
        upstream_deploy(cfg, folded)


def classifier(backbone, in_channels):
    return dict(type='ImageClassifier', backbone=backbone,
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead', num_classes=3, in_channels=in_channels,
                          loss=dict(type='CrossEntropyLoss')))


def test_reparameterized_becomes_its_module():
    """``mmreparam.Reparameterized`` folds to the upstream module with its own keys: the
    config becomes its ``module`` (no Pretrained init: the weights are in deploy.pth) and
    the state_dict stays as it is."""
    inner = dict(type='ResNet', depth=18, base_channels=8, out_indices=(3, ),
                 init_cfg=dict(type='Pretrained', checkpoint='upstream.pth'))
    cfg = Config(dict(
        default_scope='mmpretrain', load_from='train.pth',
        custom_imports=dict(imports=['mmreparam'], allow_failed_imports=False),
        custom_hooks=[dict(type='mmreparam.FoldHook')],
        model=classifier(dict(type='mmreparam.Reparameterized', reparam='OREPA',
                              module=inner), 64)))
    plain = build('mmpretrain', classifier(dict(inner, init_cfg=None), 64))
    state = randomize_bn(plain).state_dict()
    pair = upstream_deploy(cfg, state)
    assert pair.config.model.backbone == dict(type='ResNet', depth=18, base_channels=8,
                                              out_indices=(3, ))
    assert pair.parts == ['backbone: mmreparam.Reparameterized -> mmpretrain.ResNet']
    assert set(pair.state_dict) == set(state)
    assert all(torch.equal(pair.state_dict[k], v) for k, v in state.items())
    assert 'custom_imports' not in pair.config and pair.config.custom_hooks == []
    assert pair.config.load_from is None
    assert 'mmreparam' not in pair.config.pretty_text


def test_syncbn_and_the_rest_of_the_config():
    """mmreparam.SyncBN becomes BN (the same state and eval-mode function); other imports
    stay."""
    norm_cfg = dict(type='mmreparam.SyncBN', requires_grad=True)
    backbone = dict(type='mmreparam.ResNet', depth=18, reparam='OREPA', base_channels=8,
                    out_indices=(3, ), norm_cfg=norm_cfg,
                    init_cfg=dict(type='Pretrained', checkpoint='imagenet.pth'))
    cfg = Config(dict(default_scope='mmpretrain',
                      custom_imports=dict(imports=['mmreparam', 'os.path']),
                      model=classifier(backbone, 64)))
    model = build('mmpretrain', classifier(dict(backbone, init_cfg=None), 64))
    randomize_bn(model).eval()
    folded = mmreparam.fold(model)
    pair = upstream_deploy(cfg, folded)
    assert pair.config.model.backbone.norm_cfg == dict(type='BN', requires_grad=True)
    assert 'init_cfg' not in pair.config.model.backbone
    assert pair.config.custom_imports.imports == ['os.path']
    upstream = evaluated(build('mmpretrain', pair.config.model))
    upstream.load_state_dict(pair.state_dict, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(folded(x, mode='tensor'), upstream(x, mode='tensor')) <= 1e-5


def test_state_that_does_not_fit_the_config():
    node = dict(type='mmreparam.ResNet', depth=18, base_channels=8, init_cfg=None)
    cfg = Config(dict(default_scope='mmdet', model=node))
    state = mmreparam.fold(build('mmdet', node)).state_dict()
    state.pop('layer1.0.conv1.reparam_conv.bias')
    with pytest.raises(NoUpstreamForm, match='do not fit a deploy=True'):
        upstream_deploy(cfg, state)
    unfolded = build('mmdet', node).state_dict()
    with pytest.raises(NoUpstreamForm, match='do not fit'):
        upstream_deploy(cfg, unfolded)


def test_deploy_form_option():
    node = dict(type='mmreparam.ResNet', depth=18, base_channels=8, init_cfg=None)
    cfg = Config(dict(default_scope='mmdet', model=node))
    folded = mmreparam.fold(build('mmdet', node))
    ours = deploy_pair(folded, cfg, 'mmreparam')
    assert ours['form'] == 'mmreparam' and ours['config'].model.type == 'mmreparam.ResNet'
    assert ours['config'].model.deploy is True
    assert deploy_pair(folded, cfg)['form'] == 'upstream'
    with pytest.raises(ValueError, match='deploy_form'):
        deploy_pair(folded, cfg, 'onnx')


def test_a_config_without_a_scope_gets_mmdets_resnet():
    node = dict(type='mmreparam.ResNet', depth=18, reparam='ACB', base_channels=8,
                init_cfg=None)
    folded = mmreparam.fold(trained('mmdet', node))
    pair = upstream_deploy(Config(dict(model=node)), folded)
    assert pair.config.model.type == 'mmdet.ResNet'
    upstream = evaluated(build(None, pair.config.model))
    upstream.load_state_dict(pair.state_dict, strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(folded(x), upstream(x)) <= 1e-5
