"""mmreparam.RepVGG: every arch builds, RepVGG and OREPA-VGG fold exactly."""
import pytest
import torch

import mmreparam
from mmreparam.models.backbones import RepVGG
from mmreparam.testing import randomize_bn, randomize_parameters


def test_repvgg_arches_and_reparams():
    x = torch.randn(1, 3, 32, 32)
    for arch in RepVGG.arch_settings:
        model = RepVGG(arch, base_channels=16, out_indices=(0, 1, 2, 3)).eval()
        outs = model(x)
        assert len(outs) == 4
    with pytest.raises(ValueError, match='arch'):
        RepVGG('Z9')
    with pytest.raises(ValueError, match='reparam'):
        RepVGG('A0', reparam='DBB')


@pytest.mark.parametrize('reparam', ['RepVGG', 'OREPA_VGG'])
@pytest.mark.parametrize('arch', ['A0', 'B1g2', 'D2se'])
def test_repvgg_folds_exactly(arch, reparam):
    torch.manual_seed(0)
    model = RepVGG(arch, reparam=reparam, base_channels=8, out_indices=(0, 1, 2, 3))
    randomize_parameters(model, ('vector', 'idconv1'), seed=1)
    model = randomize_bn(model, seed=2).double().eval()
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert err['max_rel'] < 1e-10, err
    deploy = RepVGG(arch, reparam=reparam, base_channels=8, out_indices=(0, 1, 2, 3),
                    deploy=True).double()
    deploy.load_state_dict(folded.state_dict(), strict=True)
    model.switch_to_deploy()  # the mmpretrain-style in-place name
    assert model.deploy and set(model.state_dict()) == set(deploy.state_dict())


def test_arch_dict_keys_as_mmpretrain():
    from mmreparam.models.backbones import RepVGG as Ours
    tiny = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25])
    assert Ours(dict(tiny, stem_channels=24)).stem.out_channels == 24
    assert Ours(dict(tiny)).stem.out_channels == 16
    with pytest.raises(ValueError, match=r'group_layer_map names layers \[5\]'):
        Ours(dict(tiny, group_layer_map={2: 2, 5: 2}))
    with pytest.raises(ValueError, match='se_cfg is not supported'):
        Ours(dict(tiny, se_cfg=dict(ratio=16)))
    with pytest.raises(ValueError, match="unknown arch keys \\['widths'\\]"):
        Ours(dict(tiny, widths=[1]))
