"""Foreign checkpoint layouts loaded into mmreparam backbones (``init_cfg=Pretrained``):
the official OREPA / DBB / ACB ResNets and RepVGG / OREPA-VGG, mmpretrain's RepVGG, and plain
ResNets in torchvision's, mmdet's and mmpretrain's layouts expanded into every block type.

The official checkpoints come from ``official_checkpoints`` (written without mmreparam);
plain ResNets from mmdet's and torchvision's own models. The backbone loaded through
``init_cfg=dict(type='Pretrained', ...)`` must reproduce those outputs in float64 (eval mode,
random BN statistics) to a relative error of 1e-10.
"""
import pytest
import torch
from helpers import (
    F64,
    check,
    image,
    prefixed,
    pretrained,
    reparam_types,
    run,
    torchvision_features,
)
from official_checkpoints import (
    R50,
    official_repvgg,
    official_resnet,
    reference_repvgg,
    reference_resnet,
    save_official_train,
    to_mmpretrain,
)

from mmreparam.checkpoint import detect_format, read_state_dict
from mmreparam.models import RepVGG, ResNet
from mmreparam.testing import randomize_bn

TINY_VGG = dict(num_blocks=[2, 3, 2, 1], width_factor=[1, 1, 1, 2])

pytestmark = pytest.mark.usefixtures('single_thread')


# ------------------------------------------------------------------------------------------
# Official ResNet / ResNeXt (models/resnet.py, resnext.py; convnet_utils.choose_blk)


@pytest.mark.parametrize('checkpoint,deploy', [('train', False), ('deploy', True),
                                               ('train', True), ('deploy', False)])
def test_official_orepa_resnet50(orepa_r50, checkpoint, deploy):
    path = orepa_r50[checkpoint]
    assert detect_format(read_state_dict(path)[0]).name == 'official_resnet'
    model = pretrained(ResNet, path, reparam='OREPA', deploy=deploy, **R50)
    x = image()
    check(f'official OREPA ResNet-50 {checkpoint} -> {"deploy" if deploy else "train"} model',
          run(model, x), reference_resnet(x, orepa_r50['convs'], 50))


@pytest.mark.parametrize('blocktype,reparam', [('OREPA', 'OREPA'), ('DBB', 'DBB'),
                                               ('ACB', 'ACB'), ('base', 'base')])
def test_official_resnet18(tmp_path, blocktype, reparam):
    train, deploy, convs = official_resnet(blocktype, 18, base=16, stem=32, seed=1)
    x = image(1)
    for mode, state in (('train', train), ('deploy', deploy)):
        path = save_official_train(tmp_path / f'{mode}.pth.tar', state, 'ResNet-18')
        model = pretrained(ResNet, path, reparam=reparam, depth=18, base_channels=16,
                           stem_channels=32)
        check(f'official {blocktype} ResNet-18 {mode}', run(model, x),
              reference_resnet(x, convs, 18))


def test_official_orepa_resnext(tmp_path):
    # groups=8 > 4: the 1x1-kxk branch is 2x wide and the dw-pw rows are interleaved.
    train, deploy, convs = official_resnet('OREPA', 50, groups=8, width_per_group=16, seed=2)
    assert train['stage1.0.conv2.weight_orepa_1x1_kxk_idconv1'].shape == (32, 2, 1, 1)
    x = image(2)
    for mode, state in (('train', train), ('deploy', deploy)):
        path = save_official_train(tmp_path / f'{mode}.pth.tar', state, 'ResNeXt-50')
        model = pretrained(ResNet, path, reparam='OREPA', groups=8, base_width=16, **R50)
        check(f'official OREPA ResNeXt-50 (g=8) {mode}', run(model, x),
              reference_resnet(x, convs, 50))

# ------------------------------------------------------------------------------------------
# Official RepVGG (DingXiaoH/RepVGG repvgg.py), OREPA-VGG (blocks_repvgg.py), mmpretrain



@pytest.mark.parametrize('orepa', [False, True], ids=['RepVGG', 'OREPA-VGG'])
def test_official_repvgg(tmp_path, orepa):
    train, deploy, blocks = official_repvgg(orepa, base=8, seed=3, **TINY_VGG)
    reparam = 'OREPA_VGG' if orepa else 'RepVGG'
    x = image(3)
    for mode, state, deploy_model in (('train', train, False), ('deploy', deploy, True),
                                      ('train', train, True), ('deploy', deploy, False)):
        torch.save(state, tmp_path / 'ckpt.pth')
        assert detect_format(state).name == 'official_repvgg'
        model = pretrained(RepVGG, tmp_path / 'ckpt.pth', arch=TINY_VGG, reparam=reparam,
                           base_channels=8, out_indices=(0, 1, 2, 3), deploy=deploy_model)
        name = 'OREPA-VGG' if orepa else 'RepVGG'
        check(f'official {name} {mode} -> {"deploy" if deploy_model else "train"} model',
              run(model, x), reference_repvgg(x, blocks, TINY_VGG['num_blocks']))


def test_official_orepa_vgg_plain_1x1(tmp_path):
    """An OREPA-VGG 1x1-kxk branch stored as a plain ``conv1`` (not identity-based)."""
    train, _, blocks = official_repvgg(True, base=8, seed=3, **TINY_VGG)
    for key in [k for k in train if k.endswith('weight_rbr_1x1_kxk_idconv1')]:
        block = key[:-len('weight_rbr_1x1_kxk_idconv1')]
        train[block + 'weight_rbr_1x1_kxk_conv1'] = train.pop(key) + train.pop(
            block + 'id_tensor')
    torch.save(train, tmp_path / 'ckpt.pth')
    model = pretrained(RepVGG, tmp_path / 'ckpt.pth', arch=TINY_VGG, reparam='OREPA_VGG',
                       base_channels=8, out_indices=(0, 1, 2, 3))
    x = image(3)
    check('official OREPA-VGG with plain 1x1-kxk conv1', run(model, x),
          reference_repvgg(x, blocks, TINY_VGG['num_blocks']))


@pytest.mark.parametrize('mode', ['train', 'deploy'])
def test_mmpretrain_repvgg(tmp_path, mode):
    arch = dict(TINY_VGG, use_se=True)
    train, deploy, blocks = official_repvgg(False, TINY_VGG['num_blocks'],
                                            TINY_VGG['width_factor'], base=16, seed=4,
                                            use_se=True)
    state = to_mmpretrain(train if mode == 'train' else deploy)
    assert 'backbone.stage_1.1.branch_3x3.norm.running_var' in state or mode == 'deploy'
    assert 'backbone.stem.se_layer.conv1.conv.weight' in state
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'mmpretrain.pth')
    x = image(4)
    reference = reference_repvgg(x, blocks, TINY_VGG['num_blocks'])
    for prefix in ('backbone.', None):
        kwargs = {} if prefix is None else dict(prefix=prefix)
        model = pretrained(RepVGG, tmp_path / 'mmpretrain.pth', arch=arch, base_channels=16,
                           out_indices=(0, 1, 2, 3), **kwargs)
        check(f'mmpretrain RepVGG (SE) {mode}, prefix={prefix}', run(model, x), reference)


# ------------------------------------------------------------------------------------------
# Plain ResNets (torchvision / mmdet / mmpretrain layout), expanded into every block type


def mmdet_resnet(seed, **kwargs):
    from mmdet.models.backbones import ResNet as MMDetResNet
    torch.manual_seed(seed)
    model = randomize_bn(MMDetResNet(**kwargs).to(F64), seed)
    model.eval()  # mmdet's ResNet.train() returns None
    return model


@pytest.fixture(scope='module')
def plain_r50(tmp_path_factory):
    """A tiny ResNet-50 in torchvision layout: mmdet's ResNet (same names) plus ``fc``."""
    net = mmdet_resnet(5, **R50)
    state = dict(net.state_dict(), **{'fc.weight': torch.randn(10, 256, dtype=F64),
                                      'fc.bias': torch.zeros(10, dtype=F64)})
    path = tmp_path_factory.mktemp('plain') / 'resnet50.pth'
    torch.save(state, path)
    return path, run(net, image(5))


def test_plain_layout_is_torchvision_layout(plain_r50):
    torchvision = pytest.importorskip('torchvision')
    names = set(torchvision.models.resnet50().state_dict())
    assert set(read_state_dict(plain_r50[0])[0]) == names
    assert detect_format(torch.load(plain_r50[0])).name == 'plain_resnet'


@pytest.mark.parametrize('reparam', reparam_types())
def test_plain_resnet50_expanded(plain_r50, reparam):
    path, reference = plain_r50
    model = pretrained(ResNet, path, reparam=reparam, **R50)
    check(f'torchvision-layout ResNet-50 -> {reparam}', run(model, image(5)), reference)
    # The expansion is a real training-form block: every branch is there, and the extra
    # ones start switched off.
    assert any(name.endswith('weight_orepa_gconv_dw') or name.endswith('dbb_avg.avgbn.weight')
               or name.endswith('rbr_1x1.bn.weight') or name.endswith('hor_bn.weight')
               or name.endswith('rbr_1x1.weight')  # QARepVGG's 1x1 branch has no BN
               for name, _ in model.named_parameters()) == (reparam != 'base')


def test_plain_resnet50_into_deploy_model(plain_r50):
    path, reference = plain_r50
    model = pretrained(ResNet, path, reparam='OREPA', deploy=True, **R50)
    check('torchvision-layout ResNet-50 -> OREPA deploy', run(model, image(5)), reference)


def test_model_bn_eps_is_respected(plain_r50):
    path, reference = plain_r50  # trained with PyTorch's eps=1e-5
    model = pretrained(ResNet, path, reparam='DBB', norm_cfg=dict(type='BN', eps=1e-3), **R50)
    check('torchvision-layout ResNet-50 -> DBB with BN eps=1e-3', run(model, image(5)),
          reference)


def test_torchvision_resnet18(tmp_path):
    """The real torchvision ResNet-18 (full width: 64 internal channels in the OREPA stem)."""
    torchvision = pytest.importorskip('torchvision')
    torch.manual_seed(6)
    net = randomize_bn(torchvision.models.resnet18().to(F64), 6).eval()
    torch.save(net.state_dict(), tmp_path / 'resnet18.pth')
    x = image(6)
    reference = torchvision_features(net, x)
    model = pretrained(ResNet, tmp_path / 'resnet18.pth', depth=18, reparam='OREPA')
    check('torchvision ResNet-18 -> OREPA', run(model, x), reference)


@pytest.mark.parametrize('library,avg_down', [('mmdet', False), ('mmdet', True),
                                              ('mmpretrain', True)])
def test_deep_stem_resnets(tmp_path, library, avg_down):
    """mmdet's ResNetV1c/V1d (stem.0/1/3/4/6/7) and mmpretrain's ResNetV1d (ConvModules)."""
    kwargs = dict(R50, deep_stem=True, avg_down=avg_down)
    if library == 'mmdet':
        net = mmdet_resnet(7, **kwargs)
    else:
        from mmpretrain.models.backbones import ResNetV1d
        torch.manual_seed(7)
        net = randomize_bn(ResNetV1d(out_indices=(0, 1, 2, 3), **R50).to(F64), 7)
        net.eval()
    # A whole detector / classifier: the backbone under 'backbone.', other parts beside it.
    state = dict(prefixed('backbone.', net.state_dict()),
                 **{'head.fc.weight': torch.zeros(4, 4)})
    torch.save({'meta': {}, 'state_dict': state}, tmp_path / 'whole.pth')
    x = image(7)
    model = pretrained(ResNet, tmp_path / 'whole.pth', reparam='OREPA', prefix='backbone.',
                       **kwargs)
    name = f'{library} ResNetV1{"d" if avg_down else "c"}'
    check(f'{name} (deep stem) -> OREPA', run(model, x), run(net, x))
