"""Loading the official RepMLP-ResNet checkpoints (DingXiaoH/RepMLP, pre-2022
``repmlp_resnet.py`` / ``repmlp_blocks.py`` / ``repmlp.py``) into ``mmreparam.RepMLPResNet``.

The fixtures write the official train and deploy state_dicts from random float64 weights
through a path independent of mmreparam: the official names, the official deploy
conversion (``RepMLP.get_equivalent_fc1_fc3_params``: ``_fuse_bn``, ``_convert_conv_to_fc``,
the BN after the average pooling folded into ``fc1``; ``ConvBN.switch_to_deploy``) and the
official forward (``RepMLPResNet`` / ``BaseBlock`` / ``RepMLPLightBlock`` /
``RepMLPBottleneckBlock`` / ``RepMLP.forward``, BNs in eval mode) are transcribed below as
small functions. The backbone loaded through ``init_cfg=dict(type='Pretrained', ...)`` must
load every tensor and reproduce the official outputs in float64 to a relative error of 1e-10.
A ResNet-50 at base width 8 on 112x112 inputs with the official 7x7 partitions and
``(1, 3, 5)`` local kernels: stage 2 (14x14) has 2x2 partitions and a global perceptron,
stage 3 (7x7) one partition and none.
"""
import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import F64, Rand, check, float64_default, prefixed, run, sub

from mmreparam.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    detect_format,
    load_pretrained,
    read_state_dict,
)
from mmreparam.models import RepMLPResNet

BASE, IMG, PART, KERNELS = 8, 112, 7, (1, 3, 5)
FC3_GROUPS = dict(light=4, bottleneck=8)  # create_RepMLPRes50_{Light,Bottleneck}_224
BOTTLENECK_R = (2, 4)
MODEL = dict(base_channels=BASE, img_size=IMG, out_indices=(0, 1, 2, 3))
HEAD = ('linear.weight', 'linear.bias')

pytestmark = pytest.mark.usefixtures('single_thread')


# ------------------------------------------------------------------------------------------
# Official deploy conversion (repmlp.py, repmlp_blocks.py), transcribed


def fuse_bn(weight, bn, eps=1e-5):  # RepMLP._fuse_bn
    std = (bn['running_var'] + eps).sqrt()
    t = bn['weight'] / std
    t = t.reshape(-1, 1, 1, 1) if weight.dim() == 4 else t.reshape(-1, 1)
    return weight * t, bn['bias'] - bn['running_mean'] * bn['weight'] / std


def convert_conv_to_fc(kernel, bias, channels, h, w, groups):  # RepMLP._convert_conv_to_fc
    per_group = channels * h * w // groups
    eye = torch.eye(per_group, dtype=F64).repeat(1, groups).reshape(per_group, channels, h, w)
    fc_k = F.conv2d(eye, kernel, padding=kernel.size(2) // 2, groups=groups)
    fc_k = fc_k.reshape(channels * h * w // groups, channels * h * w).t()
    return fc_k, bias.repeat_interleave(h * w)


def repmlp_deploy(p, channels, h, w, groups):  # RepMLP.get_equivalent_fc1_fc3_params
    fc_weight, fc_bias = fuse_bn(p['fc3.weight'], sub(p, 'fc3_bn.'))
    largest = max(KERNELS)
    total_kernel, total_bias = fuse_bn(p[f'repconv{largest}.conv.weight'],
                                       sub(p, f'repconv{largest}.bn.'))
    for k in KERNELS:
        if k != largest:
            kernel, bias = fuse_bn(p[f'repconv{k}.conv.weight'], sub(p, f'repconv{k}.bn.'))
            total_kernel = total_kernel + F.pad(kernel, [(largest - k) // 2] * 4)
            total_bias = total_bias + bias
    rep_weight, rep_bias = convert_conv_to_fc(total_kernel, total_bias, channels, h, w, groups)
    deploy = {'fc3.weight': rep_weight.reshape_as(fc_weight) + fc_weight,
              'fc3.bias': rep_bias + fc_bias}
    if 'avg.bn.weight' in p:  # remove the BN after the average pooling
        avgbn = sub(p, 'avg.bn.')
        std = (avgbn['running_var'] + 1e-5).sqrt()
        scale = avgbn['weight'] / std
        avgbias = avgbn['bias'] - avgbn['running_mean'] * scale
        fc1_weight = p['fc1_fc2.fc1.weight']
        times = fc1_weight.shape[1] // len(avgbias)
        deploy['fc1_fc2.fc1.bias'] = p['fc1_fc2.fc1.bias'] + fc1_weight.matmul(
            avgbias.repeat_interleave(times).view(-1, 1)).squeeze()
        deploy['fc1_fc2.fc1.weight'] = fc1_weight * scale.repeat_interleave(times).view(1, -1)
        deploy.update({key: p[key] for key in ('fc1_fc2.fc2.weight', 'fc1_fc2.fc2.bias')})
    return deploy


# ------------------------------------------------------------------------------------------
# Official RepMLP-ResNet (repmlp_resnet.py RepMLPResNet._make_stage), train and deploy keys


def official_repmlp_resnet(block_type, seed=0):
    """Train and deploy state_dicts of an official RepMLP-Res50 at base width ``BASE``."""
    rnd = Rand(seed)
    train, deploy = {}, {}

    def conv_bn(name, cin, cout, k):  # ConvBN / ConvBNReLU
        params = {'conv.weight': rnd.normal(cout, cin, k, k, scale=math.sqrt(2 / (cin * k * k))),
                  **prefixed('bn.', rnd.bn(cout))}
        kernel, bias = fuse_bn(params['conv.weight'], sub(params, 'bn.'))
        train.update(prefixed(name + '.', params))
        deploy.update({f'{name}.conv.weight': kernel, f'{name}.conv.bias': bias})

    def repmlp(name, channels, size, groups):  # RepMLP(C=O=channels, H=W=size, h=w=PART)
        parts = (size // PART)**2
        params = {}
        if parts > 1:  # need_global_perceptron; fc1_fc2_reduction=1
            n = channels * parts
            params.update({'fc1_fc2.fc1.weight': rnd.normal(n, n, scale=1 / math.sqrt(n)),
                           'fc1_fc2.fc1.bias': rnd.normal(n, scale=0.1),
                           'fc1_fc2.fc2.weight': rnd.normal(n, n, scale=1 / math.sqrt(n)),
                           'fc1_fc2.fc2.bias': rnd.normal(n, scale=0.1),
                           **prefixed('avg.bn.', rnd.bn(channels))})
        fan_in = channels * PART * PART // groups
        params['fc3.weight'] = rnd.normal(channels * PART * PART, fan_in, 1, 1,
                                          scale=1 / math.sqrt(fan_in))
        params.update(prefixed('fc3_bn.', rnd.bn(channels * PART * PART)))
        for k in KERNELS:
            params[f'repconv{k}.conv.weight'] = rnd.normal(
                channels, channels // groups, k, k, scale=math.sqrt(1 / (channels * k * k)))
            params.update(prefixed(f'repconv{k}.bn.', rnd.bn(channels)))
        train.update(prefixed(name + '.', params))
        deploy.update(prefixed(name + '.', repmlp_deploy(params, channels, PART, PART, groups)))

    conv_bn('stage0.0', 3, BASE, 7)
    in_channels = BASE
    for s, (num_blocks, ratio) in enumerate(zip((3, 4, 6, 3), (4, 8, 16, 32)), 1):
        channels = 4 * BASE * 2**(s - 1)
        for i in range(num_blocks):
            name, stride = f'stage{s}.{i}', 2 if s > 1 and i == 0 else 1
            if stride == 2 or ratio not in (8, 16):  # BaseBlock
                if stride != 1 or in_channels != channels:
                    conv_bn(f'{name}.shortcut', in_channels, channels, 1)
                conv_bn(f'{name}.conv1', in_channels, channels // 4, 1)
                conv_bn(f'{name}.conv2', channels // 4, channels // 4, 3)
                conv_bn(f'{name}.conv3', channels // 4, channels, 1)
            elif block_type == 'light':  # RepMLPLightBlock
                mid = channels // 8
                conv_bn(f'{name}.light_conv1', in_channels, mid, 1)
                repmlp(f'{name}.light_repmlp', mid, IMG // ratio, FC3_GROUPS['light'])
                conv_bn(f'{name}.light_conv3', mid, channels, 1)
            else:  # RepMLPBottleneckBlock
                mid = channels // 4
                repmlp_channels = mid // BOTTLENECK_R[0 if ratio == 8 else 1]
                conv_bn(f'{name}.btnk_conv1', in_channels, mid, 1)
                conv_bn(f'{name}.btnk_conv2', mid, repmlp_channels, 3)
                repmlp(f'{name}.btnk_repmlp', repmlp_channels, IMG // ratio,
                       FC3_GROUPS['bottleneck'])
                conv_bn(f'{name}.btnk_conv4', repmlp_channels, mid, 3)
                conv_bn(f'{name}.btnk_conv5', mid, channels, 1)
            in_channels = channels
    head = {'linear.weight': rnd.normal(10, in_channels), 'linear.bias': rnd.normal(10)}
    return dict(train, **head), dict(deploy, **head)


# ------------------------------------------------------------------------------------------
# Official forward, transcribed (train or deploy state; BNs in eval mode)


def bn_eval(x, bn):
    return F.batch_norm(x, bn['running_mean'], bn['running_var'], bn['weight'], bn['bias'],
                        training=False, eps=1e-5)


def conv_bn_forward(p, name, x, stride=1, relu=True):
    kernel = p[f'{name}.conv.weight']
    y = F.conv2d(x, kernel, p.get(f'{name}.conv.bias'), stride, kernel.shape[-1] // 2,
                 groups=x.shape[1] // kernel.shape[1])
    if f'{name}.bn.weight' in p:
        y = bn_eval(y, sub(p, f'{name}.bn.'))
    return F.relu(y) if relu else y


def repmlp_forward(p, x):  # RepMLP.forward
    _, c, height, width = x.shape
    h_parts, w_parts = height // PART, width // PART
    out_channels = p['fc3.weight'].shape[0] // PART**2
    groups = c * PART * PART // p['fc3.weight'].shape[1]
    if 'fc1_fc2.fc1.weight' in p:
        v = F.avg_pool2d(x, PART)
        if 'avg.bn.weight' in p:
            v = bn_eval(v, sub(p, 'avg.bn.'))
        v = v.reshape(-1, c * h_parts * w_parts)
        v = F.linear(F.relu(F.linear(v, p['fc1_fc2.fc1.weight'], p['fc1_fc2.fc1.bias'])),
                     p['fc1_fc2.fc2.weight'], p['fc1_fc2.fc2.bias'])
        inputs = (x.reshape(-1, c, h_parts, PART, w_parts, PART)
                  + v.reshape(-1, c, h_parts, 1, w_parts, 1))
    else:
        inputs = x.reshape(-1, c, h_parts, PART, w_parts, PART)
    partitions = inputs.permute(0, 2, 4, 1, 3, 5)
    fc3_out = F.conv2d(partitions.reshape(-1, c * PART * PART, 1, 1), p['fc3.weight'],
                       p.get('fc3.bias'), groups=groups)
    fc3_out = fc3_out.reshape(-1, out_channels * PART * PART)
    if 'fc3_bn.weight' in p:
        fc3_out = bn_eval(fc3_out, sub(p, 'fc3_bn.'))
    fc3_out = fc3_out.reshape(-1, h_parts, w_parts, out_channels, PART, PART)
    if 'fc3_bn.weight' in p:  # the local perceptron
        conv_inputs = partitions.reshape(-1, c, PART, PART)
        conv_out = sum(conv_bn_forward(p, f'repconv{k}', conv_inputs, relu=False)
                       for k in KERNELS)
        fc3_out = fc3_out + conv_out.reshape(-1, h_parts, w_parts, out_channels, PART, PART)
    return fc3_out.permute(0, 3, 1, 4, 2, 5).reshape(-1, out_channels, height, width)


def reference_forward(p, x):
    """The official RepMLPResNet forward up to stage 4; the output of every stage."""
    x = F.max_pool2d(conv_bn_forward(p, 'stage0.0', x, stride=2), 3, 2, 1)
    outs = []
    for s, num_blocks in enumerate((3, 4, 6, 3), 1):
        for i in range(num_blocks):
            name, stride = f'stage{s}.{i}', 2 if s > 1 and i == 0 else 1
            if f'{name}.conv1.conv.weight' in p:
                y = conv_bn_forward(p, f'{name}.conv1', x)
                y = conv_bn_forward(p, f'{name}.conv2', y, stride)
                y = conv_bn_forward(p, f'{name}.conv3', y, relu=False)
            elif f'{name}.light_conv1.conv.weight' in p:
                y = conv_bn_forward(p, f'{name}.light_conv1', x)
                y = F.relu(repmlp_forward(sub(p, f'{name}.light_repmlp.'), y))
                y = conv_bn_forward(p, f'{name}.light_conv3', y, relu=False)
            else:
                y = conv_bn_forward(p, f'{name}.btnk_conv2', conv_bn_forward(
                    p, f'{name}.btnk_conv1', x))
                y = F.relu(repmlp_forward(sub(p, f'{name}.btnk_repmlp.'), y))
                y = conv_bn_forward(p, f'{name}.btnk_conv4', y)
                y = conv_bn_forward(p, f'{name}.btnk_conv5', y, relu=False)
            shortcut = (conv_bn_forward(p, f'{name}.shortcut', x, stride, relu=False)
                        if f'{name}.shortcut.conv.weight' in p else x)
            x = F.relu(y + shortcut)
        outs.append(x)
    return outs


# ------------------------------------------------------------------------------------------
# Helpers


def image(seed=0):
    return helpers.image(seed, size=IMG, batch=2)


def pretrained(checkpoint, **kwargs):
    """RepMLPResNet with init_cfg=Pretrained, built in float64, initialised, eval mode."""
    return helpers.pretrained(RepMLPResNet, checkpoint, **MODEL, **kwargs)


@pytest.fixture(scope='module', params=['light', 'bottleneck'])
def official(request, tmp_path_factory):
    """The official train / deploy checkpoints of one arch, their reference outputs."""
    arch = request.param
    train, deploy = official_repmlp_resnet(arch, seed=len(arch))
    folder = tmp_path_factory.mktemp(f'repmlp_{arch}')
    torch.save(train, folder / f'RepMLP-Res50-{arch}-224_train.pth')
    torch.save(deploy, folder / f'RepMLP-Res50-{arch}-224_deploy.pth')
    x = image()
    with torch.no_grad():
        reference = reference_forward(train, x)
        # The transcribed official conversion computes what the train-time network does.
        check(f'{arch}: official deploy vs train (fixture)', reference_forward(deploy, x),
              reference, 1e-12)
    return dict(arch=arch, x=x, reference=reference,
                train=folder / f'RepMLP-Res50-{arch}-224_train.pth',
                deploy=folder / f'RepMLP-Res50-{arch}-224_deploy.pth')


# ------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize('form', ['train', 'deploy'])
def test_official_repmlp_resnet_loads_exactly(official, form):
    """Every tensor of the model is loaded (none left over but the classifier) and the
    outputs of every stage are the official ones."""
    arch, path = official['arch'], official[form]
    fmt = detect_format(read_state_dict(path)[0])
    assert fmt.name == 'official_repmlp_resnet'
    assert f'RepMLP-Res50 {arch.capitalize()}' in fmt.description and f'{form})' in \
        fmt.description
    assert fmt.folded is (form == 'deploy') and fmt.reparam == 'base'
    model = pretrained(path, arch=arch, deploy=form == 'deploy')
    check(f'official {arch} {form} -> {form} model', run(model, official['x']),
          official['reference'])

    _, report = convert_checkpoint(model, path)
    print(f'[official RepMLP] {report.summary()}')
    assert len(report.loaded) == report.num_model_tensors
    assert not (report.missing or report.unexpected or report.mismatched)
    assert sorted(report.ignored) == sorted(HEAD)
    assert not report.converted_blocks  # same form: every block copied


def test_official_repmlp_train_into_other_reparam(official):
    """The conv blocks of an official train checkpoint expand into another ``reparam``
    (here ACB); the RepMLP units are copied."""
    model = pretrained(official['train'], arch=official['arch'], reparam='ACB')
    check(f"official {official['arch']} train -> ACB train model", run(model, official['x']),
          official['reference'])
    _, report = convert_checkpoint(model, official['train'])
    assert report.converted_blocks and not (report.missing or report.unexpected)


@pytest.mark.parametrize('form', ['train', 'deploy'])
def test_official_repmlp_other_form_is_refused_by_name(official, form):
    """RepMLP units are not converted between forms at load time: the error names the
    first unit (ours and the official name) and says what to do."""
    arch = official['arch']
    unit = 'light_repmlp' if arch == 'light' else 'btnk_repmlp'
    with float64_default():
        model = RepMLPResNet(arch, deploy=form == 'train', **MODEL)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, official[form])
    message = str(err.value)
    assert f'layer2.1.repmlp: the checkpoint has a {form}-form RepMLP here' in message
    assert f'(stage2.1.{unit}.*)' in message and 'mmreparam.fold' in message


def test_own_repmlp_checkpoint_of_the_other_form_is_refused():
    """The same holds for mmreparam's own RepMLPResNet checkpoints (copied by name, a train
    RepMLP would give a deploy model a wrong ``fc3``)."""
    train = RepMLPResNet('light', **MODEL)
    with pytest.raises(CheckpointError, match=r'layer2\.1\.repmlp: the checkpoint has a '
                       r'train-form RepMLP here \(layer2\.1\.repmlp\.\*\)'):
        load_pretrained(RepMLPResNet('light', deploy=True, **MODEL), train.state_dict())
    folded = RepMLPResNet('light', **MODEL).eval()
    folded.switch_to_deploy()
    with pytest.raises(CheckpointError, match='has a deploy-form RepMLP here'):
        load_pretrained(RepMLPResNet('light', **MODEL), folded.state_dict())


def test_official_repmlp_convert_tool(official, tmp_path, capsys, load_tool):
    """``tools/convert.py --arch RepMLP-Res50-<arch>-224``: a train checkpoint with
    ``--deploy`` is loaded and folded; a deploy checkpoint is copied, and refused (one error
    line, nothing written) for a train-form output."""
    tool = load_tool('convert')
    arch = official['arch']
    for form in ('train', 'deploy'):
        dst = tmp_path / f'{form}.pth'
        assert tool.main([str(official[form]), str(dst), '--arch', f'RepMLP-Res50-{arch}-224',
                          '--deploy', '--set', f'base_channels={BASE}', f'img_size={IMG}']) == 0
        out = capsys.readouterr().out
        assert 'official RepMLP-Res50' in out and 'unused' not in out and 'missing' not in out
        saved = torch.load(dst)
        assert saved['meta']['backbone']['type'] == 'RepMLPResNet'
        assert set(saved['state_dict']) == set(RepMLPResNet(arch, deploy=True,
                                                            **MODEL).state_dict())
        model = pretrained(dst, arch=arch, deploy=True)
        check(f'tools/convert.py official {arch} {form} -> deploy (float32)',
              run(model, official['x']), official['reference'], 1e-5)

    dst = tmp_path / 'train.pth'
    dst.unlink()
    assert tool.main([str(official['deploy']), str(dst), '--arch', f'RepMLP-Res50-{arch}',
                      '--set', f'base_channels={BASE}', f'img_size={IMG}']) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith('error:')
    assert 'has a deploy-form RepMLP here' in errors[0] and not dst.exists()


def test_official_style_layout_without_repmlp_units_stays_unknown(tmp_path):
    """``stage0.0.*`` keys without RepMLP units (e.g. the official code's block_type='base',
    or another network) are an unknown layout, not guessed."""
    state = {'stage0.0.conv.weight': torch.zeros(8, 3, 7, 7), 'stage0.0.bn.weight': torch.ones(8),
             'stage1.0.conv1.conv.weight': torch.zeros(8, 8, 1, 1),
             'stage2.1.light_mlp.fc3.weight': torch.zeros(8, 8, 1, 1)}
    fmt = detect_format(state)
    assert fmt.name == 'unknown' and 'unknown layout' in fmt.description
    torch.save(state, tmp_path / 'foreign.pth')
    with pytest.raises(CheckpointError, match='unknown layout'):
        load_pretrained(RepMLPResNet('light', **MODEL), tmp_path / 'foreign.pth')
