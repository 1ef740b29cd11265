"""Loading other checkpoint layouts into mmreparam backbones (``init_cfg=Pretrained``).

The fixtures write checkpoints in the official layouts from random float64 weights through
a path independent of mmreparam: the official weight generation and fusion (OREPA's
``weight_gen`` / ``dwsc2full`` / ``fre_init``, DBB's ``transI``-``transVI``, RepVGG's
``get_equivalent_kernel_bias``) and naming are transcribed below, and the network the
weights define is computed by a small functional reference (one conv with bias per layer).
Plain ResNets come from mmdet's and torchvision's own models. The backbone loaded through
``init_cfg=dict(type='Pretrained', ...)`` must reproduce those outputs in float64 (eval mode,
random BN statistics) to a relative error of 1e-10.
"""
import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmreparam.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    detect_format,
    load_pretrained,
    read_state_dict,
)
from mmreparam.models import OREPALargeConv, RepVGG, ResNet
from mmreparam.testing import randomize_bn, randomize_parameters

F64 = torch.float64
MAX_REL_ERROR = 1e-10
REPO = Path(__file__).resolve().parents[2]
R50 = dict(depth=50, base_channels=8, stem_channels=64)  # a tiny ResNet-50
TINY_VGG = dict(num_blocks=[2, 3, 2, 1], width_factor=[1, 1, 1, 2])


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    """These tensors are tiny: one thread is much faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def image(seed=0, size=32):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=F64)


class Rand:
    """Seeded float64 tensors for the fixtures."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape, scale=1.0):
        return torch.randn(*shape, generator=self.gen, dtype=F64) * scale

    def uniform(self, *shape, low, high):
        return torch.rand(*shape, generator=self.gen, dtype=F64) * (high - low) + low

    def conv(self, cout, cin, k):
        return self.normal(cout, cin, k, k, scale=math.sqrt(2.0 / (cin * k * k)))

    def bn(self, c):
        return dict(weight=self.uniform(c, low=0.5, high=1.5),
                    bias=self.uniform(c, low=-0.5, high=0.5),
                    running_mean=self.uniform(c, low=-0.5, high=0.5),
                    running_var=self.uniform(c, low=0.5, high=2.0),
                    num_batches_tracked=torch.tensor(1000))


def prefixed(prefix, state):
    return {prefix + key: value for key, value in state.items()}


def sub(state, prefix):
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def fuse_bn(kernel, bn, eps=1e-5):  # transI_fusebn
    t = bn['weight'] / (bn['running_var'] + eps).sqrt()
    return kernel * t.reshape(-1, 1, 1, 1), bn['bias'] - bn['running_mean'] * t


def max_rel_error(outputs, reference):
    diff = max((a - b).abs().max().item() for a, b in zip(outputs, reference))
    return diff / max(b.abs().max().item() for b in reference)


def check(name, outputs, reference):
    assert len(outputs) == len(reference)
    error = max_rel_error(outputs, reference)
    print(f'[round trip] {name}: max relative error {error:.1e}')
    assert error <= MAX_REL_ERROR, f'{name}: {error}'


@contextlib.contextmanager
def float64_default():
    """Build in float64, so that helper buffers (OREPA's prior) are float64-accurate."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def pretrained(backbone, checkpoint, **kwargs):
    """Build a backbone with init_cfg=Pretrained in float64, initialise it, eval mode."""
    init_cfg = dict(type='Pretrained', checkpoint=str(checkpoint))
    if 'prefix' in kwargs:
        init_cfg['prefix'] = kwargs.pop('prefix')
    with float64_default():
        model = backbone(init_cfg=init_cfg, **kwargs)
    model.init_weights()
    return model.eval()


def run(model, x):
    with torch.no_grad():
        return list(model(x))


# ------------------------------------------------------------------------------------------
# Official OREPA blocks (JUGGHM/OREPA_CVPR2022 blocks.py), transcribed


def fre_init(out_channels, kernel_size=3):
    prior = torch.zeros(out_channels, kernel_size, kernel_size, dtype=F64)
    half_fg = out_channels / 2
    for i in range(out_channels):
        for h in range(3):
            for w in range(3):
                if i < half_fg:
                    prior[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    prior[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half_fg) / 3)
    return prior


def dwsc2full(weight_dw, weight_pw, groups, groups_conv=1):
    t, ig, h, w = weight_dw.size()
    o, _, _, _ = weight_pw.size()
    tg = int(t / groups)
    i = int(ig * groups)
    ogc = int(o / groups_conv)
    groups_gc = int(groups / groups_conv)
    weight_dw = weight_dw.view(groups_conv, groups_gc, tg, ig, h, w)
    weight_pw = weight_pw.squeeze().view(ogc, groups_conv, groups_gc, tg)
    weight_dsc = torch.einsum('cgtihw,ocgt->cogihw', weight_dw, weight_pw)
    return weight_dsc.reshape(o, int(i / groups_conv), h, w)


def orepa_params(rnd, cin, cout, k=3, groups=1, with_bn=True):
    ig = cin // groups
    internal = cin if groups <= 4 else 2 * cin
    id_tensor = torch.zeros(internal, ig, 1, 1, dtype=F64)
    for i in range(internal):
        id_tensor[i, i % ig, 0, 0] = 1
    params = {
        'weight_orepa_origin': rnd.conv(cout, ig, k),
        'weight_orepa_avg_conv': rnd.conv(cout, ig, 1),
        'weight_orepa_pfir_conv': rnd.conv(cout, ig, 1),
        'weight_orepa_1x1': rnd.conv(cout, ig, 1),
        'weight_orepa_1x1_kxk_idconv1': rnd.normal(internal, ig, 1, 1, scale=0.1),
        'weight_orepa_1x1_kxk_conv2': rnd.conv(cout, internal // groups, k),
        'weight_orepa_gconv_dw': rnd.conv(8 * cin, 1, k),
        'weight_orepa_gconv_pw': rnd.conv(cout, 8 * cin // groups, 1),
        'vector': rnd.normal(6, cout, scale=0.5),
        'weight_orepa_avg_avg': torch.ones(k, k, dtype=F64) / k / k,
        'id_tensor': id_tensor,
        'weight_orepa_prior': fre_init(cout, k),
    }
    if with_bn:
        params.update(prefixed('bn.', rnd.bn(cout)))
    return params


def orepa_weight_gen(p, in_channels, groups):
    v = p['vector']
    weight_orepa_origin = torch.einsum('oihw,o->oihw', p['weight_orepa_origin'], v[0, :])
    weight_orepa_avg = torch.einsum(
        'oihw,o->oihw',
        torch.einsum('oi,hw->oihw', p['weight_orepa_avg_conv'].squeeze(3).squeeze(2),
                     p['weight_orepa_avg_avg']), v[1, :])
    weight_orepa_pfir = torch.einsum(
        'oihw,o->oihw',
        torch.einsum('oi,ohw->oihw', p['weight_orepa_pfir_conv'].squeeze(3).squeeze(2),
                     p['weight_orepa_prior']), v[2, :])
    conv1 = (p['weight_orepa_1x1_kxk_idconv1'] + p['id_tensor']).squeeze(3).squeeze(2)
    conv2 = p['weight_orepa_1x1_kxk_conv2']
    if groups > 1:
        t, ig = conv1.size()
        o, tg, h, w = conv2.size()
        conv1 = conv1.view(groups, int(t / groups), ig)
        conv2 = conv2.view(groups, int(o / groups), tg, h, w)
        weight_1x1_kxk = torch.einsum('gti,gothw->goihw', conv1, conv2).reshape(o, ig, h, w)
    else:
        weight_1x1_kxk = torch.einsum('ti,othw->oihw', conv1, conv2)
    weight_1x1_kxk = torch.einsum('oihw,o->oihw', weight_1x1_kxk, v[3, :])
    pad = (weight_orepa_origin.shape[-1] - 1) // 2  # transVI_multiscale
    weight_1x1 = torch.einsum('oihw,o->oihw', F.pad(p['weight_orepa_1x1'], [pad] * 4), v[4, :])
    weight_gconv = torch.einsum(
        'oihw,o->oihw',
        dwsc2full(p['weight_orepa_gconv_dw'], p['weight_orepa_gconv_pw'], in_channels,
                  groups), v[5, :])
    return (weight_orepa_origin + weight_orepa_avg + weight_1x1 + weight_1x1_kxk
            + weight_orepa_pfir + weight_gconv)


def or1x1_params(rnd, cin, cout):
    params = {'weight_or1x1_origin': rnd.conv(cout, cin, 1)}
    if cout > cin:
        params['weight_or1x1_l2i_conv1'] = (torch.eye(cin, dtype=F64).reshape(cin, cin, 1, 1)
                                            + rnd.normal(cin, cin, 1, 1, scale=0.1))
        params['weight_or1x1_l2i_conv2'] = rnd.conv(cout, cin, 1)
    else:
        params['weight_or1x1_l2i_conv1'] = rnd.conv(cout, cin, 1)
        params['weight_or1x1_l2i_conv2'] = (torch.eye(cout, dtype=F64).reshape(
            cout, cout, 1, 1) + rnd.normal(cout, cout, 1, 1, scale=0.1))
    params['vector'] = rnd.normal(2, cout, scale=0.7)
    return dict(params, **prefixed('bn.', rnd.bn(cout)))


def or1x1_weight_gen(p):
    v = p['vector']
    origin = torch.einsum('oihw,o->oihw', p['weight_or1x1_origin'], v[0, :])
    l2i = torch.einsum('tihw,othw->oihw', p['weight_or1x1_l2i_conv1'],
                       p['weight_or1x1_l2i_conv2'])
    return origin + torch.einsum('oihw,o->oihw', l2i, v[1, :])


def large_conv_params(rnd, cin, cout, k=7):
    layers = (k - 1) // 2
    params = {}
    for i in range(layers):
        params.update(prefixed(f'weight{i}.', orepa_params(rnd, cin if i == 0 else cout, cout,
                                                            with_bn=False)))
    return dict(params, **prefixed('bn.', rnd.bn(cout)))


def large_conv_weight_gen(p, cin, cout, k=7):
    weight = orepa_weight_gen(sub(p, 'weight0.'), cin, 1).transpose(0, 1)
    for i in range((k - 1) // 2 - 1):
        weight2 = orepa_weight_gen(sub(p, f'weight{i + 1}.'), cout, 1)
        weight = F.conv2d(weight, weight2, groups=1, padding=2)
    return weight.transpose(0, 1)


# ------------------------------------------------------------------------------------------
# Official DBB (DingXiaoH/DiverseBranchBlock dbb_transforms.py), transcribed


def trans_iii_1x1_kxk(k1, b1, k2, b2):
    k = F.conv2d(k2, k1.permute(1, 0, 2, 3))
    b_hat = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    return k, b_hat + b2


def trans_v_avg(channels, kernel_size, groups=1):
    input_dim = channels // groups
    k = torch.zeros((channels, input_dim, kernel_size, kernel_size), dtype=F64)
    k[torch.arange(channels), torch.arange(input_dim).repeat(groups), :, :] = \
        1.0 / kernel_size**2
    return k


def dbb_params(rnd, cin, cout, k=3):
    return {
        'dbb_origin.conv.weight': rnd.conv(cout, cin, k),
        **prefixed('dbb_origin.bn.', rnd.bn(cout)),
        'dbb_avg.conv.weight': rnd.conv(cout, cin, 1),
        **prefixed('dbb_avg.bn.bn.', rnd.bn(cout)),
        **prefixed('dbb_avg.avgbn.', rnd.bn(cout)),
        'dbb_1x1.conv.weight': rnd.conv(cout, cin, 1),
        **prefixed('dbb_1x1.bn.', rnd.bn(cout)),
        'dbb_1x1_kxk.idconv1.weight': rnd.normal(cin, cin, 1, 1, scale=0.1),
        **prefixed('dbb_1x1_kxk.bn1.bn.', rnd.bn(cin)),
        'dbb_1x1_kxk.conv2.weight': rnd.conv(cout, cin, k),
        **prefixed('dbb_1x1_kxk.bn2.', rnd.bn(cout)),
    }


def dbb_kernel_bias(p, cin, cout, k=3):
    k_origin, b_origin = fuse_bn(p['dbb_origin.conv.weight'], sub(p, 'dbb_origin.bn.'))
    k_1x1, b_1x1 = fuse_bn(p['dbb_1x1.conv.weight'], sub(p, 'dbb_1x1.bn.'))
    k_1x1 = F.pad(k_1x1, [(k - 1) // 2] * 4)
    identity = torch.eye(cin, dtype=F64).reshape(cin, cin, 1, 1)
    k1, b1 = fuse_bn(p['dbb_1x1_kxk.idconv1.weight'] + identity, sub(p, 'dbb_1x1_kxk.bn1.bn.'))
    k2, b2 = fuse_bn(p['dbb_1x1_kxk.conv2.weight'], sub(p, 'dbb_1x1_kxk.bn2.'))
    k_1x1_kxk, b_1x1_kxk = trans_iii_1x1_kxk(k1, b1, k2, b2)
    k2a, b2a = fuse_bn(trans_v_avg(cout, k), sub(p, 'dbb_avg.avgbn.'))
    k1a, b1a = fuse_bn(p['dbb_avg.conv.weight'], sub(p, 'dbb_avg.bn.bn.'))
    k_avg, b_avg = trans_iii_1x1_kxk(k1a, b1a, k2a, b2a)
    return (k_origin + k_1x1 + k_1x1_kxk + k_avg, b_origin + b_1x1 + b_1x1_kxk + b_avg)


def acb_params(rnd, cin, cout, k=3):  # ACBlock (DiverseBranchBlock acb.py)
    return {'square_conv.weight': rnd.conv(cout, cin, k), **prefixed('square_bn.', rnd.bn(cout)),
            'ver_conv.weight': rnd.normal(cout, cin, k, 1, scale=0.3),
            **prefixed('ver_bn.', rnd.bn(cout)),
            'hor_conv.weight': rnd.normal(cout, cin, 1, k, scale=0.3),
            **prefixed('hor_bn.', rnd.bn(cout))}


def acb_kernel_bias(p):  # ACNet acb.py get_equivalent_kernel_bias / _add_to_square_kernel
    square, square_b = fuse_bn(p['square_conv.weight'], sub(p, 'square_bn.'))
    for name in ('ver', 'hor'):
        asym, asym_b = fuse_bn(p[f'{name}_conv.weight'], sub(p, f'{name}_bn.'))
        sh, sw = square.shape[2:]
        ah, aw = asym.shape[2:]
        square = square.clone()
        square[:, :, sh // 2 - ah // 2:sh // 2 - ah // 2 + ah,
               sw // 2 - aw // 2:sw // 2 - aw // 2 + aw] += asym
        square_b = square_b + asym_b
    return square, square_b


# ------------------------------------------------------------------------------------------
# Official ResNet / ResNeXt (models/resnet.py, resnext.py; convnet_utils.choose_blk)

DEPLOY_NAME = dict(ConvBN='conv', OREPA='orepa_reparam', OREPA_1x1='or1x1_reparam',
                   OREPA_LargeConv='or_large_reparam', DBB='dbb_reparam', ACB='fused_conv')


def official_block(rnd, blocktype, cin, cout, k, groups=1, assign_type=None):
    """(block class name, params, fused kernel, fused bias) of one official conv_bn."""
    if assign_type:
        kind = assign_type
    elif blocktype == 'OREPA':
        kind = 'OREPA_1x1' if k == 1 else 'OREPA_LargeConv' if k >= 7 else 'OREPA'
    elif blocktype == 'base' or k == 1 or k >= 7:
        kind = 'ConvBN'
    else:
        kind = blocktype
    if kind == 'ConvBN':
        params = {'conv.weight': rnd.conv(cout, cin // groups, k),
                  **prefixed('bn.', rnd.bn(cout))}
        kernel, bias = fuse_bn(params['conv.weight'], sub(params, 'bn.'))
    elif kind == 'OREPA':
        params = orepa_params(rnd, cin, cout, k, groups)
        kernel, bias = fuse_bn(orepa_weight_gen(params, cin, groups), sub(params, 'bn.'))
    elif kind == 'OREPA_1x1':
        params = or1x1_params(rnd, cin, cout)
        kernel, bias = fuse_bn(or1x1_weight_gen(params), sub(params, 'bn.'))
    elif kind == 'OREPA_LargeConv':
        params = large_conv_params(rnd, cin, cout, k)
        kernel, bias = fuse_bn(large_conv_weight_gen(params, cin, cout, k), sub(params, 'bn.'))
    elif kind == 'ACB':
        params = acb_params(rnd, cin, cout, k)
        kernel, bias = acb_kernel_bias(params)
    else:
        params = dbb_params(rnd, cin, cout, k)
        kernel, bias = dbb_kernel_bias(params, cin, cout, k)
    return kind, params, kernel, bias


def official_resnet(blocktype, depth, base=8, stem=64, groups=1, width_per_group=64, seed=0):
    """Train and deploy state_dicts of an official ResNet / ResNeXt, and its fused convs."""
    rnd = Rand(seed)
    bottleneck = depth >= 50
    num_blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    train, deploy, convs = {}, {}, {}

    def add(name, cin, cout, k, groups=1, assign_type=None):
        kind, params, kernel, bias = official_block(rnd, blocktype, cin, cout, k, groups,
                                                    assign_type)
        train.update(prefixed(name + '.', params))
        deploy.update({f'{name}.{DEPLOY_NAME[kind]}.weight': kernel,
                       f'{name}.{DEPLOY_NAME[kind]}.bias': bias})
        convs[name] = (kernel, bias)

    add('stage0.conv1', 3, stem, 7)
    in_planes = stem
    for s, n in enumerate(num_blocks, 1):
        planes = base * 2**(s - 1)
        for i in range(n):
            name = f'stage{s}.{i}'
            if bottleneck:
                width = groups * int(planes * width_per_group / 64)
                if i == 0 and (s > 1 or in_planes != 4 * planes):  # stride or width change
                    add(f'{name}.shortcut', in_planes, 4 * planes, 1)
                add(f'{name}.conv1', in_planes, width, 1)
                add(f'{name}.conv2', width, width, 3, groups)
                add(f'{name}.conv3', width, 4 * planes, 1)
                in_planes = 4 * planes
            else:
                if s > 1 and i == 0 or in_planes != planes:
                    add(f'{name}.shortcut', in_planes, planes, 1, assign_type='ConvBN')
                add(f'{name}.conv1', in_planes, planes, 3)
                add(f'{name}.conv2', planes, planes, 3)
                in_planes = planes
    head = {'linear.weight': rnd.normal(10, in_planes), 'linear.bias': rnd.normal(10)}
    return dict(train, **head), dict(deploy, **head), convs


def reference_resnet(x, convs, depth, strides=(1, 2, 2, 2)):
    """The official ResNet forward, one conv with bias per official conv_bn."""

    def conv(name, x, stride=1):
        kernel, bias = convs[name]
        return F.conv2d(x, kernel, bias, stride, kernel.shape[-1] // 2, 1,
                        x.shape[1] // kernel.shape[1])

    x = F.max_pool2d(F.relu(conv('stage0.conv1', x, 2)), 3, 2, 1)
    outs = []
    for s, n in enumerate({18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth], 1):
        for i in range(n):
            name, stride = f'stage{s}.{i}.', strides[s - 1] if i == 0 else 1
            if depth >= 50:
                y = F.relu(conv(name + 'conv1', x))
                y = conv(name + 'conv3', F.relu(conv(name + 'conv2', y, stride)))
            else:
                y = conv(name + 'conv2', F.relu(conv(name + 'conv1', x, stride)))
            shortcut = conv(name + 'shortcut', x, stride) if name + 'shortcut' in convs else x
            x = F.relu(y + shortcut)
        outs.append(x)
    return outs


def save_official_train(path, state, arch):
    """As the official train.py: DDP keys, wrapped with training state."""
    torch.save({'epoch': 120, 'arch': arch, 'best_acc1': torch.tensor(77.3),
                'state_dict': prefixed('module.', state),
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0, 'params': [0]}]}},
               path)
    return path


@pytest.fixture(scope='module')
def orepa_r50(tmp_path_factory):
    train, deploy, convs = official_resnet('OREPA', 50)
    folder = tmp_path_factory.mktemp('orepa_r50')
    torch.save(deploy, folder / 'deploy.pth')
    return dict(train=save_official_train(folder / 'ResNet-50_OREPA.pth.tar', train,
                                          'ResNet-50'),
                deploy=folder / 'deploy.pth', convs=convs)


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


def repvgg_layout(num_blocks, width_factor, base):
    """(official name, mmpretrain name, in, out, stride) of every block."""
    channels = min(64, int(base * width_factor[0]))
    blocks = [('stage0', 'stem', 3, channels, 2)]
    for s, n in enumerate(num_blocks, 1):
        out = int(base * 2**(s - 1) * width_factor[s - 1])
        for i in range(n):
            blocks.append((f'stage{s}.{i}', f'stage_{s}.{i}', channels, out, 2 if i == 0 else 1))
            channels = out
    return blocks


def orepa_vgg_dense_params(rnd, cin, cout, six_rows, k=3):
    params = {
        'weight_rbr_origin': rnd.conv(cout, cin, k),
        'weight_rbr_avg_conv': rnd.conv(cout, cin, 1),
        'weight_rbr_pfir_conv': rnd.conv(cout, cin, 1),
        'weight_rbr_1x1_kxk_idconv1': rnd.normal(cin, cin, 1, 1, scale=0.1),
        'weight_rbr_1x1_kxk_conv2': rnd.conv(cout, cin, k),
        'weight_rbr_gconv_dw': rnd.conv(8 * cin, 1, k),
        'weight_rbr_gconv_pw': rnd.conv(cout, 8 * cin, 1),
        'vector': rnd.normal(6 if six_rows else 5, cout, scale=0.5),
        'weight_rbr_avg_avg': torch.ones(k, k, dtype=F64) / k / k,
        'id_tensor': torch.eye(cin, dtype=F64).reshape(cin, cin, 1, 1),
        'weight_rbr_prior': fre_init(cout, k),
    }
    if six_rows:
        params['vector'][5] = 1e30  # never initialised, never used by the official code
    return dict(params, **prefixed('bn.', rnd.bn(cout)))


def orepa_vgg_weight_gen(p, in_channels):
    v = p['vector']
    origin = torch.einsum('oihw,o->oihw', p['weight_rbr_origin'], v[0, :])
    avg = torch.einsum('oihw,o->oihw', torch.einsum(
        'oi,hw->oihw', p['weight_rbr_avg_conv'].squeeze(), p['weight_rbr_avg_avg']), v[1, :])
    pfir = torch.einsum('oihw,o->oihw', torch.einsum(
        'oi,ohw->oihw', p['weight_rbr_pfir_conv'].squeeze(), p['weight_rbr_prior']), v[2, :])
    conv1 = (p['weight_rbr_1x1_kxk_idconv1'] + p['id_tensor']).squeeze()
    kxk = torch.einsum('oihw,o->oihw', torch.einsum(
        'ti,othw->oihw', conv1, p['weight_rbr_1x1_kxk_conv2']), v[3, :])
    dw, pw = p['weight_rbr_gconv_dw'], p['weight_rbr_gconv_pw']
    t, ig, h, w = dw.size()
    o = pw.size(0)
    tg = int(t / in_channels)
    dw = dw.view(in_channels, tg, ig, h, w)
    pw = pw.squeeze().view(o, in_channels, tg)
    gconv = torch.einsum('gtihw,ogt->ogihw', dw, pw).reshape(o, int(ig * in_channels), h, w)
    gconv = torch.einsum('oihw,o->oihw', gconv, v[4, :])
    return origin + avg + kxk + pfir + gconv


def official_repvgg(orepa, num_blocks, width_factor, base, seed=0, use_se=False):
    """Train and deploy state_dicts of an official RepVGG / OREPA-VGG, its fused blocks."""
    rnd = Rand(seed)
    train, deploy, blocks = {}, {}, []
    for name, _, cin, cout, stride in repvgg_layout(num_blocks, width_factor, base):
        identity = cin == cout and stride == 1
        if orepa:
            dense = orepa_vgg_dense_params(rnd, cin, cout, six_rows=identity)
            k3, b3 = fuse_bn(orepa_vgg_weight_gen(dense, cin), sub(dense, 'bn.'))
        else:
            dense = {'conv.weight': rnd.conv(cout, cin, 3), **prefixed('bn.', rnd.bn(cout))}
            k3, b3 = fuse_bn(dense['conv.weight'], sub(dense, 'bn.'))
        params = dict(prefixed('rbr_dense.', dense), **{'rbr_1x1.conv.weight': rnd.conv(
            cout, cin, 1)}, **prefixed('rbr_1x1.bn.', rnd.bn(cout)))
        k1, b1 = fuse_bn(params['rbr_1x1.conv.weight'], sub(params, 'rbr_1x1.bn.'))
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if identity:
            params.update(prefixed('rbr_identity.', rnd.bn(cin)))
            id_kernel = torch.zeros(cin, cin, 3, 3, dtype=F64)
            for i in range(cin):
                id_kernel[i, i, 1, 1] = 1
            kid, bid = fuse_bn(id_kernel, sub(params, 'rbr_identity.'))
            kernel, bias = kernel + kid, bias + bid
        se = {}
        if use_se:
            se = {'se.down.weight': rnd.conv(cout // 16, cout, 1),
                  'se.down.bias': rnd.normal(cout // 16, scale=0.1),
                  'se.up.weight': rnd.conv(cout, cout // 16, 1),
                  'se.up.bias': rnd.normal(cout, scale=0.1)}
        train.update(prefixed(name + '.', dict(params, **se)))
        deploy.update(prefixed(name + '.', {'rbr_reparam.weight': kernel,
                                            'rbr_reparam.bias': bias, **se}))
        blocks.append((kernel, bias, stride, se))
    head = {'linear.weight': rnd.normal(10, cout), 'linear.bias': rnd.normal(10)}
    return dict(train, **head), dict(deploy, **head), blocks


def reference_repvgg(x, blocks, num_blocks):
    ends = {sum(num_blocks[:s + 1]) for s in range(len(num_blocks))}
    outs = []
    for index, (kernel, bias, stride, se) in enumerate(blocks):
        x = F.conv2d(x, kernel, bias, stride, 1)
        if se:
            gate = F.relu(F.conv2d(F.adaptive_avg_pool2d(x, 1), se['se.down.weight'],
                                   se['se.down.bias']))
            x = x * torch.sigmoid(F.conv2d(gate, se['se.up.weight'], se['se.up.bias']))
        x = F.relu(x)
        if index in ends:
            outs.append(x)
    return outs


def to_mmpretrain(state):
    """The mmpretrain converter's renaming (tools/model_converters/repvgg_to_mmcls.py)."""
    converted = {}
    for key, value in state.items():
        parts = key.split('.')
        if parts[0] == 'stage0':
            parts = ['backbone', 'stem'] + parts[1:]
        elif parts[0].startswith('stage'):
            parts = ['backbone', 'stage_' + parts[0][5:]] + parts[1:]
        elif parts[0] == 'linear':
            parts = ['head', 'fc'] + parts[1:]
        names = {'bn': 'norm', 'rbr_identity': 'branch_norm', 'rbr_1x1': 'branch_1x1',
                 'rbr_dense': 'branch_3x3', 'rbr_reparam': 'branch_reparam',
                 'se': 'se_layer', 'down': 'conv1.conv', 'up': 'conv2.conv'}
        converted['.'.join(names.get(part, part) for part in parts)] = value
    return converted


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


@pytest.mark.parametrize('reparam', ['base', 'ACB', 'DBB', 'OREPA', 'RepVGG', 'OREPA_VGG'])
def test_plain_resnet50_expanded(plain_r50, reparam):
    path, reference = plain_r50
    model = pretrained(ResNet, path, reparam=reparam, **R50)
    check(f'torchvision-layout ResNet-50 -> {reparam}', run(model, image(5)), reference)
    # The expansion is a real training-form block: every branch is there, and the extra
    # ones start switched off.
    assert any(name.endswith('weight_orepa_gconv_dw') or name.endswith('dbb_avg.avgbn.weight')
               or name.endswith('rbr_1x1.bn.weight') or name.endswith('hor_bn.weight')
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
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        reference = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            reference.append(y)
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


# ------------------------------------------------------------------------------------------
# mmreparam's own checkpoints, mixed conversions and refusals


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


# ------------------------------------------------------------------------------------------
# tools/convert.py


def convert_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(REPO / 'tools' / 'convert.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_convert_tool(orepa_r50, tmp_path):
    dst = tmp_path / 'r50_deploy.pth'
    result = convert_tool(orepa_r50['train'], dst, '--arch', 'ResNet-50', '--deploy', '--set',
                          'base_channels=8', 'stem_channels=64')
    assert result.returncode == 0, result.stderr
    assert 'official OREPA ResNet' in result.stdout
    saved = torch.load(dst)
    assert saved['meta']['backbone']['reparam'] == 'OREPA'
    assert set(saved['state_dict']) == set(ResNet(reparam='OREPA', deploy=True,
                                                  **R50).state_dict())
    assert not (tmp_path / 'r50_deploy.pth.tmp').exists()
    model = pretrained(ResNet, dst, reparam='OREPA', deploy=True, **R50)
    x = image()
    outputs, reference = run(model, x), reference_resnet(x, orepa_r50['convs'], 50)
    assert max_rel_error(outputs, reference) < 1e-5  # the tool saves float32

    result = convert_tool(tmp_path / 'missing.pth', dst, '--arch', 'ResNet-50')
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith('error:')] == [
        f"error: checkpoint '{tmp_path / 'missing.pth'}' does not exist"]


def test_convert_tool_refuses_bad_input(orepa_r50, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('convert_tool', REPO / 'tools' / 'convert.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dst = tmp_path / 'out.pth'
    for args, message in (
        (['--arch', 'ResNet-18', '--set', 'base_channels=8', 'stem_channels=32'],
         'does not fit ResNet'),
        (['--arch', 'VGG-16'], "unknown --arch 'VGG-16'"),
        (['--arch', 'ResNet-50', '--reparam', 'XYZ'], "unknown reparam 'XYZ'"),
    ):
        assert tool.main([str(orepa_r50['train']), str(dst), *args]) == 1
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith('error:') and message in errors[0]
        assert not dst.exists()


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


def test_unknown_official_style_layout_is_named_not_guessed(tmp_path):
    """``stage0.*`` keys that are neither an OREPA/DBB ResNet, a RepVGG nor a RepMLP-ResNet
    (here: a Sequential stem and plain units, as the RepMLP code's ``block_type='base'``) are
    reported as an unknown layout, not read as a RepVGG."""
    state = {'stage0.0.conv.weight': torch.zeros(8, 3, 7, 7), 'stage0.0.bn.weight': torch.ones(8),
             'stage1.0.conv1.conv.weight': torch.zeros(8, 8, 1, 1)}
    fmt = detect_format(state)
    assert fmt.name == 'unknown' and 'unknown layout' in fmt.description
    torch.save(state, tmp_path / 'foreign.pth')
    with pytest.raises(CheckpointError, match='unknown layout'):
        load_pretrained(RepVGG('A0', base_channels=8), tmp_path / 'foreign.pth')


def test_block_type_detection_follows_the_blocks():
    """The converter recognises blocks by the blocks' own state_markers: every block type's
    state, in any model, is recognised with its reparam."""
    from mmreparam.checkpoint.formats import blocks_reparam
    for reparam in ('base', 'ACB', 'DBB', 'OREPA', 'RepVGG', 'QARepVGG', 'OREPA_VGG'):
        model = ResNet(depth=18, reparam=reparam, base_channels=8, stem_channels=32)
        assert blocks_reparam(model.state_dict()) == reparam
        assert detect_format(model.state_dict()).reparam == reparam
    vgg = RepVGG('A0', reparam='QARepVGG', base_channels=8)
    assert detect_format(vgg.state_dict()).reparam == 'QARepVGG'
