"""timm checkpoints of the architectures mmreparam builds: RepVGG (``repvgg_*``, train and
reparameterized) and ResNet-D (``resnet*d``, deep stem ``conv1.0/1/3/4/6``).

The timm models are built locally with random weights and BN statistics (no download); the
mmreparam backbone loaded through ``init_cfg=Pretrained``, ``tools/convert.py`` or
``mmreparam.expand`` must compute timm's own ``forward_features`` in float64 to a relative
error of 1e-10.
"""
import pytest
import torch
from helpers import F64, MAX_REL_ERROR, float64_default, image, pretrained

import mmreparam
from mmreparam.checkpoint import detect_format
from mmreparam.models import RepVGG, ResNet
from mmreparam.testing import randomize_bn

timm = pytest.importorskip('timm', reason='timm is not installed (requirements/tests.txt)')

pytestmark = pytest.mark.usefixtures('single_thread')


def timm_model(name, seed, reparameterized=False):
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=7).to(F64),
                         seed).eval()
    if reparameterized:
        with float64_default():
            model = timm.utils.reparameterize_model(model)
    return model


def features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


def last_output(model, x):
    with torch.no_grad():
        return model.eval()(x)[-1]


def rel_error(out, reference):
    return ((out - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope='module')
def repvgg_a0(tmp_path_factory):
    """timm repvgg_a0 in both forms (a whole classifier checkpoint, ``head.fc`` included)."""
    path = tmp_path_factory.mktemp('timm')
    out = {}
    for form, reparameterized in (('train', False), ('deploy', True)):
        model = timm_model('repvgg_a0', 1, reparameterized)
        torch.save({'state_dict': model.state_dict()}, path / f'repvgg_a0_{form}.pth')
        out[form] = (path / f'repvgg_a0_{form}.pth', model)
    return out


@pytest.mark.parametrize('form', ['train', 'deploy'])
@pytest.mark.parametrize('reparam,deploy', [('RepVGG', False), ('RepVGG', True),
                                            ('OREPA_VGG', False)])
def test_timm_repvgg_loads_through_init_cfg(repvgg_a0, form, reparam, deploy):
    path, net = repvgg_a0[form]
    fmt = detect_format(torch.load(path)['state_dict'])
    assert (fmt.name, fmt.reparam, fmt.folded) == ('timm_repvgg', 'RepVGG', form == 'deploy')
    x = image(1)
    model = pretrained(RepVGG, path, arch='A0', reparam=reparam, deploy=deploy,
                       out_indices=(3, ))
    assert rel_error(last_output(model, x), features(net, x)) <= MAX_REL_ERROR


def test_timm_repvgg_through_expand_and_convert_tool(repvgg_a0, tmp_path, load_tool):
    path, net = repvgg_a0['deploy']
    x = image(2)
    with float64_default():
        model = RepVGG(arch='A0', reparam='OREPA_VGG', out_indices=(3, ))
    report = mmreparam.expand(model, net)  # strict: every tensor found its place
    assert report.format.name == 'timm_repvgg' and report.ignored == ['head.fc.weight',
                                                                       'head.fc.bias']
    assert rel_error(last_output(model, x), features(net, x)) <= MAX_REL_ERROR

    dst = tmp_path / 'a0_deploy.pth'
    assert load_tool('convert').main([str(path), str(dst), '--arch', 'repvgg_a0',
                                      '--deploy']) == 0
    model = pretrained(RepVGG, dst, arch='A0', deploy=True, out_indices=(3, ))
    assert rel_error(last_output(model, x), features(net, x)) < 1e-5  # saved in float32


@pytest.mark.parametrize('name,depth', [('resnet18d', 18),
                                        pytest.param('resnet50d', 50, marks=pytest.mark.slow)])
def test_timm_resnet_d(tmp_path, load_tool, name, depth):
    net = timm_model(name, 3)
    state = net.state_dict()
    assert {'conv1.0.weight', 'conv1.1.running_var', 'conv1.6.weight', 'bn1.weight'} <= set(
        state)
    torch.save(state, tmp_path / f'{name}.pth')
    assert detect_format(state).name == 'timm_resnet_d'
    x = image(3)
    reference = features(net, x)
    kwargs = dict(depth=depth, deep_stem=True, avg_down=True)
    for reparam in ('base', 'OREPA'):
        model = pretrained(ResNet, tmp_path / f'{name}.pth', reparam=reparam, **kwargs)
        assert rel_error(last_output(model, x), reference) <= MAX_REL_ERROR, reparam
    with float64_default():
        model = ResNet(reparam='DBB', **kwargs)
    mmreparam.expand(model, net)
    assert rel_error(last_output(model, x), reference) <= MAX_REL_ERROR

    dst = tmp_path / 'converted.pth'
    assert load_tool('convert').main([str(tmp_path / f'{name}.pth'), str(dst), '--arch', name,
                                      '--reparam', 'ACB']) == 0
    model = pretrained(ResNet, dst, reparam='ACB', **kwargs)
    assert rel_error(last_output(model, x), reference) < 1e-5  # saved in float32


def test_timm_repvgg_with_se_as_in_repvgg_d2se():
    """repvgg_d2se's SE (``attn.fc1`` / ``attn.fc2``, channels // 16), at a small width."""
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg
    widths = (0.5, 0.5, 0.5, 1.)
    cfg = ByoModelCfg(blocks=_rep_vgg_bcfg(d=(1, 2, 1, 1), wf=widths), stem_type='rep',
                      stem_chs=32, attn_layer='se', attn_kwargs=dict(rd_ratio=0.0625,
                                                                      rd_divisor=1))
    torch.manual_seed(4)
    net = randomize_bn(ByobNet(cfg, num_classes=3).to(F64), 4).eval()
    x = image(4)
    for form in ('train', 'deploy'):
        if form == 'deploy':
            with float64_default():
                net = timm.utils.reparameterize_model(net)
        with float64_default():
            model = RepVGG(arch=dict(num_blocks=[1, 2, 1, 1], width_factor=list(widths),
                                     use_se=True), out_indices=(3, ))
        mmreparam.expand(model, net)
        assert rel_error(last_output(model, x), features(net, x)) <= MAX_REL_ERROR, form
