"""The converter (``convert_checkpoint``, ``load_pretrained``): mmreparam's own checkpoints
into other block types and forms, the large-kernel expansion, reports of partial loads,
refusals of the wrong architecture, and ``Pretrained`` inside an ``init_cfg`` list.

Outputs are compared in float64 (eval mode, random BN statistics) to a relative error of
1e-10; official checkpoints come from ``official_checkpoints`` (written without mmreparam).
"""
import pytest
import torch
from helpers import F64, check, float64_default, image, prefixed, pretrained, run
from official_checkpoints import R50

from mmreparam.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    load_pretrained,
    read_state_dict,
)
from mmreparam.models import OREPALargeConv, RepVGG, ResNet
from mmreparam.testing import randomize_bn, randomize_parameters

pytestmark = pytest.mark.usefixtures('single_thread')


def own_model(reparam, seed, deploy=False):
    torch.manual_seed(seed)
    with float64_default():
        model = ResNet(reparam=reparam, deploy=deploy, **R50)
    randomize_bn(model, seed)
    return randomize_parameters(model, ['vector', 'idconv1', 'idconv1.weight'], seed)


def test_own_checkpoints(tmp_path):
    source = own_model('DBB', 8).eval()
    x = image(8)
    reference = run(source, x)
    torch.save({'meta': {}, 'state_dict': prefixed('backbone.', source.state_dict())},
               tmp_path / 'dbb.pth')
    for reparam, deploy in (('DBB', False), ('DBB', True), ('OREPA', False)):
        model = pretrained(ResNet, tmp_path / 'dbb.pth', reparam=reparam, deploy=deploy, **R50)
        check(f'mmreparam DBB train -> {reparam} {"deploy" if deploy else "train"}',
              run(model, x), reference)
    torch.save(model.state_dict(), tmp_path / 'orepa.pth')
    model = pretrained(ResNet, tmp_path / 'orepa.pth', reparam='OREPA', deploy=True, **R50)
    check('mmreparam OREPA train -> OREPA deploy', run(model, x), reference)
    torch.save(model.state_dict(), tmp_path / 'deploy.pth')
    model = pretrained(ResNet, tmp_path / 'deploy.pth', reparam='ACB', **R50)
    check('mmreparam deploy -> ACB train', run(model, x), reference)


def test_large_conv_expansion():
    block = OREPALargeConv(3, 64, 7, stride=2).to(F64)
    kernel = torch.randn(64, 3, 7, 7, dtype=F64)
    state = {'reparam_conv.weight': kernel, 'reparam_conv.bias': torch.randn(64, dtype=F64)}
    converted, report = convert_checkpoint(block, state)
    block.load_state_dict(converted)
    assert len(report.converted_blocks) == 1
    assert torch.allclose(block.generate_kernel(), kernel, rtol=0, atol=1e-12)
    for i in range(3):  # the generators are dense (no dead channels)
        assert (block.get_submodule(f'weight{i}').weight_orepa_origin.abs().sum((1, 2, 3))
                > 0).all()
    narrow = {'reparam_conv.weight': kernel[:16], 'reparam_conv.bias': torch.zeros(16)}
    with pytest.raises(CheckpointError, match='internal channels'):
        convert_checkpoint(OREPALargeConv(3, 16, 7), narrow)


def test_wrong_architecture_is_refused(orepa_r50, tmp_path):
    with pytest.raises(CheckpointError, match=r'checkpoint \(\d+, \d+, \d+, \d+\) vs model'):
        load_pretrained(ResNet(depth=18, reparam='OREPA', base_channels=8, stem_channels=32),
                        orepa_r50['train'])
    a0 = RepVGG('A0', base_channels=8)
    torch.save(a0.state_dict(), tmp_path / 'a0.pth')
    with pytest.raises(CheckpointError, match='stem.rbr_dense.conv.weight: checkpoint'):
        load_pretrained(RepVGG('B1', base_channels=8), tmp_path / 'a0.pth')
    with pytest.raises(CheckpointError, match='no checkpoint key starts with prefix'):
        load_pretrained(a0, tmp_path / 'a0.pth', prefix='backbone.')


def test_partial_checkpoint_is_reported(orepa_r50):
    state = read_state_dict(orepa_r50['train'])[0]
    state = {k: v for k, v in state.items() if not k.startswith('stage4.2.conv3.')}
    state['stage4.2.conv9.weight'] = torch.zeros(1)
    model = ResNet(reparam='OREPA', **R50)
    report = load_pretrained(model, state)
    assert report.format.name == 'official_resnet'
    assert 'layer4.2.conv3.weight_or1x1_origin' in report.missing
    assert report.unexpected == ['layer4.2.conv9.weight']
    assert 'linear.weight' in report.ignored and 'stem.weight0.id_tensor' in report.ignored



def test_pretrained_inside_an_init_cfg_list_is_converted(tmp_path):
    """mmengine accepts a list of inits; its Pretrained entry goes through the converter
    (a DBB checkpoint into an OREPA model), after the other entries."""
    source = own_model('DBB', 9).eval()
    x = image(9)
    reference = run(source, x)
    torch.save({'state_dict': source.state_dict()}, tmp_path / 'dbb.pth')
    init_cfg = [dict(type='Constant', val=0.0, layer='Linear'),
                dict(type='Pretrained', checkpoint=str(tmp_path / 'dbb.pth'))]
    with float64_default():
        model = ResNet(reparam='OREPA', init_cfg=init_cfg, **R50)
    model.init_weights()
    check('mmreparam DBB train -> OREPA (init_cfg list)', run(model.eval(), x), reference)
    assert model.init_cfg == init_cfg  # restored after the other inits ran
