"""mmreparam.RepVGG: every arch builds, RepVGG and OREPA-VGG fold exactly, and it takes what
mmpretrain's RepVGG takes (arch keys, ``add_ppf``, ...) with the same structure."""
import pytest
import torch
import torch.nn as nn

import mmreparam
from mmreparam.checkpoint import load_pretrained
from mmreparam.models.backbones import RepVGG
from mmreparam.models.backbones.repvgg import MTSPPF, SELayer, make_divisible
from mmreparam.testing import randomize_bn, randomize_parameters

TINY = dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25, 0.25, 0.25, 0.25])
# mmpretrain's SE options away from their defaults: ratio, divisor, both activations.
CUSTOM_SE = dict(ratio=4, divisor=4, act_cfg=(dict(type='ReLU6'), dict(type='HSigmoid')))
ALL_STAGES = (0, 1, 2, 3)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def test_repvgg_arches_and_reparams():
    x = torch.randn(1, 3, 32, 32)
    for arch in RepVGG.arch_settings:
        model = RepVGG(arch, base_channels=16, out_indices=ALL_STAGES).eval()
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
    model = RepVGG(arch, reparam=reparam, base_channels=8, out_indices=ALL_STAGES)
    randomize_parameters(model, ('vector', 'idconv1'), seed=1)
    model = randomize_bn(model, seed=2).double().eval()
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert err['max_rel'] < 1e-10, err
    deploy = RepVGG(arch, reparam=reparam, base_channels=8, out_indices=ALL_STAGES,
                    deploy=True).double()
    deploy.load_state_dict(folded.state_dict(), strict=True)
    model.switch_to_deploy()  # the mmpretrain-style in-place name
    assert model.deploy and set(model.state_dict()) == set(deploy.state_dict())


def test_arch_dict_keys_as_mmpretrain():
    # stem width: min(stem_channels, first stage width), 64 when unset (mmpretrain's rule)
    assert RepVGG(dict(TINY, stem_channels=8)).stem.out_channels == 8
    assert RepVGG(dict(TINY, stem_channels=24)).stem.out_channels == 16
    assert RepVGG(dict(TINY)).stem.out_channels == 16
    assert RepVGG(dict(TINY), base_channels=512).stem.out_channels == 64
    assert RepVGG(dict(TINY, stem_channels=96), base_channels=512).stem.out_channels == 96
    assert RepVGG('yolox-pai-small').stem.out_channels == 32
    with pytest.raises(ValueError, match=r'group_layer_map names layers \[5\]'):
        RepVGG(dict(TINY, group_layer_map={2: 2, 5: 2}))
    with pytest.raises(ValueError, match=r'group_layer_map names layers \[0\]'):
        RepVGG(dict(TINY, group_layer_map={0: 2}))
    with pytest.raises(ValueError, match="unknown arch keys \\['widths'\\]"):
        RepVGG(dict(TINY, widths=[1]))
    with pytest.raises(ValueError, match='both use_se and se_cfg'):
        RepVGG(dict(TINY, use_se=True, se_cfg=dict(ratio=16)))
    with pytest.raises(TypeError, match='se_cfg must be a dict'):
        RepVGG(dict(TINY, se_cfg=16))
    with pytest.raises(ValueError, match="misses \\['width_factor'\\]"):
        RepVGG(dict(num_blocks=[1, 1, 1, 1]))
    # the normalized arch carries mmpretrain's keys
    assert RepVGG('D2se', base_channels=8).arch['se_cfg'] == dict(ratio=16, divisor=1)
    assert RepVGG(dict(TINY, use_se=True)).arch['se_cfg'] == dict(ratio=16, divisor=1)


def test_se_cfg_builds_mmpretrain_se():
    model = RepVGG(dict(TINY, se_cfg=CUSTOM_SE), base_channels=64)
    blocks = [model.stem] + [block for stage in model.stage_modules() for block in stage]
    assert all(isinstance(block.se, SELayer) for block in blocks)
    for block in blocks:  # make_divisible(channels // ratio, divisor)
        assert block.se.down.out_channels == make_divisible(block.out_channels // 4, 4)
        assert block.se.up.out_channels == block.out_channels
        assert type(block.se.act).__name__ == 'ReLU6'
        assert type(block.se.gate).__name__ == 'HSigmoid'
    assert model.stage_4[0].se.down.out_channels == 32  # 128 // 4
    assert make_divisible(10 // 4, 4) == 4 and make_divisible(3, 1) == 3
    squeezed = RepVGG(dict(TINY, se_cfg=dict(squeeze_channels=3, bias=False)))
    assert squeezed.stem.se.down.out_channels == 3 and squeezed.stem.se.down.bias is None
    one_act = RepVGG(dict(TINY, se_cfg=dict(act_cfg=dict(type='Sigmoid'))))
    assert isinstance(one_act.stem.se.act, nn.Sigmoid) and isinstance(one_act.stem.se.gate,
                                                                      nn.Sigmoid)
    with pytest.raises(ValueError, match='return_weight'):
        RepVGG(dict(TINY, se_cfg=dict(return_weight=True)))
    with pytest.raises(ValueError, match='act_cfg must be a dict or two dicts'):
        RepVGG(dict(TINY, se_cfg=dict(act_cfg=[dict(type='ReLU')] * 3)))
    with pytest.raises(ValueError, match=r"unknown arch se_cfg keys \['ratios'\]"):
        RepVGG(dict(TINY, se_cfg=dict(ratios=4)))


@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=['fp32', 'fp64'])
@pytest.mark.parametrize('reparam', ['RepVGG', 'OREPA_VGG'])
def test_se_cfg_folds_exactly(reparam, dtype, tolerance):
    torch.manual_seed(0)
    arch = dict(num_blocks=[2, 2, 1, 1], width_factor=[1, 1, 1, 1], se_cfg=CUSTOM_SE)
    model = RepVGG(arch, reparam=reparam, base_channels=16, out_indices=ALL_STAGES)
    randomize_parameters(model, ('vector', 'idconv1'), seed=1)
    model = randomize_bn(model, seed=2).to(dtype).eval()
    folded = mmreparam.fold(model)
    assert all(isinstance(block.se, SELayer) and block.folded
               for block in folded.modules() if hasattr(block, 'folded'))
    err = mmreparam.fold_error(model, folded, torch.randn(2, 3, 32, 32, dtype=dtype))
    assert err['compared'] == 4 and err['max_rel'] < tolerance, err
    deploy = RepVGG(arch, reparam=reparam, base_channels=16, out_indices=ALL_STAGES,
                    deploy=True)
    deploy.load_state_dict(folded.state_dict(), strict=True)


@pytest.mark.parametrize('dtype,tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-10)],
                         ids=['fp32', 'fp64'])
def test_add_ppf_yolox_pai_small(dtype, tolerance):
    torch.manual_seed(0)
    model = RepVGG('yolox-pai-small', base_channels=8, out_indices=ALL_STAGES, add_ppf=True)
    assert isinstance(model.ppf, MTSPPF)
    assert model.ppf.conv1.conv.out_channels == 32 and model.ppf.conv2.conv.in_channels == 128
    model = randomize_bn(model, seed=3).to(dtype).eval()
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    outs = model(x)
    assert [tuple(out.shape) for out in outs] == [(1, 8, 16, 16), (1, 16, 8, 8),
                                                  (1, 32, 4, 4), (1, 64, 2, 2)]
    # the ppf follows the last stage and replaces its output
    with torch.no_grad():
        plain = RepVGG('yolox-pai-small', base_channels=8, out_indices=ALL_STAGES).to(dtype)
        plain.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith('ppf.')})
        plain_outs = plain.eval()(x)
        for out, plain_out in zip(outs[:3], plain_outs[:3]):
            torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
        torch.testing.assert_close(outs[3], model.ppf(plain_outs[3]), rtol=0, atol=0)
    folded = mmreparam.fold(model)
    err = mmreparam.fold_error(model, folded, x)
    assert err['compared'] == 4 and err['max_rel'] < tolerance, err
    deploy = RepVGG('yolox-pai-small', base_channels=8, out_indices=ALL_STAGES, add_ppf=True,
                    deploy=True)
    deploy.load_state_dict(folded.state_dict(), strict=True)
    assert isinstance(RepVGG('A0', base_channels=8).ppf, nn.Identity)


def test_constructor_arguments_as_mmpretrain():
    model = RepVGG(dict(TINY), out_indices=[-1, 0], conv_cfg=dict(type='Conv2d'))
    assert model.out_indices == (3, 0)
    outs = model.eval()(torch.randn(1, 3, 32, 32))
    assert [out.shape[1] for out in outs] == [16, 128]  # stage order, as mmpretrain
    assert RepVGG(dict(TINY), out_indices=2).out_indices == (2, )
    with pytest.raises(ValueError, match='out_indices'):
        RepVGG(dict(TINY), out_indices=(4, ))
    with pytest.raises(ValueError, match='out_indices'):
        RepVGG(dict(TINY), out_indices=(-5, ))
    with pytest.raises(ValueError, match='conv_cfg'):
        RepVGG(dict(TINY), conv_cfg=dict(type='ConvWS'))
    with pytest.raises(ValueError, match='frozen_stages'):
        RepVGG(dict(TINY), frozen_stages=5)
    with pytest.raises(ValueError, match='one value per stage'):
        RepVGG(dict(TINY), strides=(1, 1, 1))
    for name in ('in_channels', 'base_channels', 'strides', 'dilations', 'conv_cfg',
                 'norm_cfg', 'act_cfg', 'with_cp', 'norm_eval', 'frozen_stages'):
        assert hasattr(model, name), name
    frozen = RepVGG(dict(TINY), frozen_stages=4, add_ppf=True).train()
    assert not any(p.requires_grad for n, p in frozen.named_parameters()
                   if not n.startswith('ppf.'))
    assert all(p.requires_grad for p in frozen.ppf.parameters())  # not a stage (mmpretrain)
    norm_eval = RepVGG(dict(TINY), norm_eval=True, add_ppf=True).train()
    assert not norm_eval.ppf.conv1.bn.training


# ------------------------------------------------------------------------------------------
# Against mmpretrain's own RepVGG (same arguments -> same structure; its weights -> same
# outputs)

MMPRETRAIN_CASES = {
    **{arch: dict(arch=arch, base_channels=16) for arch in RepVGG.arch_settings},
    'A0-full': dict(arch='A0'),
    'yolox-pai-small+ppf': dict(arch='yolox-pai-small', base_channels=16, add_ppf=True),
    'A0+ppf': dict(arch='A0', base_channels=16, add_ppf=True),
    'custom-se': dict(arch=dict(num_blocks=[2, 2, 2, 1], width_factor=[1, 1, 1, 2],
                                group_layer_map={3: 2}, se_cfg=CUSTOM_SE, stem_channels=8),
                      base_channels=16),
    'strides-dilations': dict(arch='A0', base_channels=16, strides=(2, 1, 2, 1),
                              dilations=(1, 2, 1, 2)),
}


def mmpretrain_repvgg(deploy=False, **kwargs):
    backbones = pytest.importorskip('mmpretrain.models.backbones')
    arch = kwargs.get('arch')
    if isinstance(arch, dict):  # mmpretrain needs every key
        kwargs['arch'] = dict(dict(group_layer_map=None, se_cfg=None), **arch)
    model = backbones.RepVGG(out_indices=ALL_STAGES, deploy=deploy, **kwargs)
    model.eval()  # mmpretrain's train() returns None
    return model


# every case in its train form; the deploy form (one conv per block) where it differs most
STRUCTURE_CASES = [(case, False) for case in MMPRETRAIN_CASES] + [
    (case, True) for case in ('A0', 'B1g4', 'D2se', 'custom-se', 'yolox-pai-small+ppf')]


@pytest.mark.parametrize('case,deploy', STRUCTURE_CASES,
                         ids=[f'{case}-{"deploy" if deploy else "train"}'
                              for case, deploy in STRUCTURE_CASES])
def test_same_structure_as_mmpretrain(case, deploy):
    """Same arguments, same parameter and buffer counts and output shapes as mmpretrain."""
    kwargs = MMPRETRAIN_CASES[case]
    theirs = mmpretrain_repvgg(deploy=deploy, **kwargs)
    ours = RepVGG(out_indices=ALL_STAGES, deploy=deploy, **kwargs).eval()
    assert param_count(ours) == param_count(theirs)
    assert len(list(ours.buffers())) == len(list(theirs.buffers()))
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert [o.shape for o in ours(x)] == [o.shape for o in theirs(x)]


@pytest.mark.parametrize('case', ['A0', 'D2se', 'custom-se', 'yolox-pai-small+ppf'])
def test_mmpretrain_weights_same_outputs(case):
    """mmpretrain's train-time state, and its folded state, loaded into ours compute what
    mmpretrain's train-time model computes (float64, random BN statistics).

    The reference is mmpretrain's train-time model also for its folded state: mmpretrain's
    folded block skips its SE (``if self.deploy: return self.branch_reparam(inputs)``), so
    its own deploy form of an SE arch computes another function; ours keeps the SE.
    """
    kwargs = dict(MMPRETRAIN_CASES[case])
    if case == 'D2se':
        kwargs['arch'] = dict(RepVGG.arch_settings['D2se'], num_blocks=[2, 2, 2, 1])
    torch.manual_seed(0)
    theirs = randomize_bn(mmpretrain_repvgg(**kwargs), seed=1).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        reference = theirs(x)
    for deploy in (False, True):
        if deploy:
            theirs.switch_to_deploy()
        ours = RepVGG(out_indices=ALL_STAGES, deploy=deploy, **kwargs).double()
        report = load_pretrained(ours, {'state_dict': theirs.state_dict()})
        assert not (report.missing or report.unexpected or report.mismatched), report
        with torch.no_grad():
            outs = ours.eval()(x)
        assert len(outs) == 4
        for out, ref in zip(outs, reference):
            assert (out - ref).abs().max() <= 1e-10 * ref.abs().max(), (deploy, case)
