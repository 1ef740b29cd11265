"""Checkpoints in the official layouts, written without mmreparam.

Random float64 weights go through a path independent of mmreparam: the official weight
generation and fusion (OREPA's ``weight_gen`` / ``dwsc2full`` / ``fre_init``, DBB's
``transI``-``transVI``, RepVGG's ``get_equivalent_kernel_bias``) and naming are transcribed
below, and the network the weights define is computed by a small functional reference (one
conv with bias per layer). Used by the tests of the converter, the layouts and
``tools/convert.py``.
"""
import math

import torch
import torch.nn.functional as F
from helpers import F64, Rand, prefixed, sub

#: Backbone arguments of the tiny ResNet-50 that :func:`official_resnet` writes by default.
R50 = dict(depth=50, base_channels=8, stem_channels=64)


def fuse_bn(kernel, bn, eps=1e-5):  # transI_fusebn
    t = bn['weight'] / (bn['running_var'] + eps).sqrt()
    return kernel * t.reshape(-1, 1, 1, 1), bn['bias'] - bn['running_mean'] * t


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
