"""The equivalent-kernel L2: its gradient, the blocks it covers, and its config path.

The reference kernel is read from each block's eval-mode forward pass (its response to unit
impulses), not from ``get_equivalent_kernel_bias``: the gradient of the term must equal the
autograd gradient of ``||K||^2`` for that independently obtained ``K`` (fp64).
"""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import reparam_block_types
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper
from mmengine.runner import Runner
from PIL import Image

import mmreparam
from mmreparam.models import regularizers
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
from mmreparam.models.regularizers import (
    EquivalentKernelL2Loss,
    equivalent_kernel_blocks,
    equivalent_kernel_l2,
)
from mmreparam.registry import MODELS
from mmreparam.testing import randomize_bn, randomize_parameters, randomized_block

CASES = [
    (ConvBN, dict(in_channels=3, out_channels=4, kernel_size=3)),
    (ConvBN, dict(in_channels=4, out_channels=2, kernel_size=1, groups=2)),
    (ACB, dict(in_channels=4, out_channels=6, kernel_size=3, groups=2)),
    (DBB, dict(in_channels=3, out_channels=4, kernel_size=3)),  # 1x1 branch, idconv1
    (DBB, dict(in_channels=4, out_channels=4, kernel_size=3, groups=4)),  # depthwise
    (RepVGGBlock, dict(in_channels=4, out_channels=4, kernel_size=3, act_cfg=None)),
    (RepVGGBlock, dict(in_channels=3, out_channels=5, kernel_size=3, act_cfg=None)),
    (OREPA, dict(in_channels=3, out_channels=4, kernel_size=3)),
    (OREPA, dict(in_channels=4, out_channels=4, kernel_size=3, groups=2)),
    (OREPA1x1, dict(in_channels=3, out_channels=5)),
    (OREPA1x1, dict(in_channels=5, out_channels=3)),
    (OREPALargeConv, dict(in_channels=3, out_channels=4, kernel_size=5)),
    (OREPAVGGBlock, dict(in_channels=4, out_channels=4, kernel_size=3, act_cfg=None)),
]
#: Every other block type a backbone takes, at one geometry: a new block type is covered
#: without an entry above.
CASES += [(block, dict(in_channels=4, out_channels=4, kernel_size=3, act_cfg=None))
          for block in reparam_block_types() if block not in {b for b, _ in CASES}]


def kernel_by_probing(block):
    """The kernel of the block's eval-mode function (stride 1, same padding), read from its
    responses to unit impulses at the centre of a ``kxk`` image."""
    k, groups = block.kernel_size, block.groups
    cin, cout = block.in_channels, block.out_channels
    c = k // 2
    impulses = torch.zeros(cin, cin, k, k, dtype=torch.float64)
    impulses[range(cin), range(cin), c, c] = 1
    response = block(impulses) - block(torch.zeros_like(impulses[:1]))
    # response[i, o, y, x] = K[o, i, 2c - y, 2c - x]
    full = response.flip(-2, -1).transpose(0, 1)  # (cout, cin, k, k)
    per_in, per_out = cin // groups, cout // groups
    group_of = torch.arange(cout) // per_out
    inside = group_of[:, None] * per_in + torch.arange(per_in)[None]
    rows = torch.arange(cout)[:, None]
    across_groups = full.detach().clone()
    across_groups[rows, inside] = 0
    assert across_groups.abs().max().item() < 1e-12  # a grouped kernel: nothing across
    return full[rows, inside]


@pytest.mark.parametrize('block,cfg', CASES,
                         ids=[f'{b.__name__}-{i}' for i, (b, _) in enumerate(CASES)])
def test_gradient_equals_autograd_of_squared_kernel_norm(block, cfg):
    module = randomized_block(block, cfg)
    params = dict(module.named_parameters())
    probed = kernel_by_probing(module)
    kernel, _ = module.get_equivalent_kernel_bias()
    assert torch.allclose(probed, kernel, rtol=1e-10, atol=1e-12)  # the probe is right

    ref = probed.square().sum()
    ours = equivalent_kernel_l2(module)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
    ref_grads = torch.autograd.grad(ref, list(params.values()), allow_unused=True)
    our_grads = torch.autograd.grad(ours, list(params.values()), allow_unused=True)
    reached = set()
    for (name, param), g_ref, g_ours in zip(params.items(), ref_grads, our_grads):
        # (the probe subtracts two responses: its bias gradients are rounding, ~1e-16)
        g_ref = torch.zeros_like(param) if g_ref is None else g_ref
        if g_ours is None:
            g_ours = torch.zeros_like(param)
        else:
            assert g_ours.abs().max() > 0, name
            reached.add(name)
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12), name
    # Every parameter but the BN shifts (which only move the bias) shapes the kernel.
    assert reached == {n for n in params if not n.endswith('bias')}


def test_autocast_does_not_lower_the_precision():
    block = randomized_block(DBB, dict(in_channels=4, out_channels=8, kernel_size=3)).float()
    ref = equivalent_kernel_l2(block)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # DBB's fold merges with a conv
        out = equivalent_kernel_l2(block)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=1e-6, atol=0)


def test_blocks_outermost_unfolded_trainable_only():
    vgg, conv, frozen, dbb = (OREPAVGGBlock(4, 4), ConvBN(4, 4, 3), RepVGGBlock(4, 4),
                              DBB(4, 4))
    model = nn.Sequential(vgg, nn.Sequential(conv, frozen), dbb)
    randomize_bn(model.double().eval())
    conv.fold()
    frozen.requires_grad_(False)
    # OREPAVGGBlock's OREPA branch is part of its kernel: counted once, through the parent.
    assert equivalent_kernel_blocks(model) == [vgg, dbb]
    expected = sum(b.get_equivalent_kernel_bias()[0].square().sum() for b in (vgg, dbb))
    assert torch.allclose(equivalent_kernel_l2(model), expected, rtol=1e-12, atol=0)
    assert equivalent_kernel_blocks(vgg) == [vgg]

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    value = equivalent_kernel_l2(plain)
    assert value.item() == 0 and not value.requires_grad
    assert equivalent_kernel_l2(nn.ReLU()).item() == 0


class TinyModel(BaseModel):
    """An mmengine model made of blocks, returning a losses dict in ``mode='loss'``."""

    def __init__(self):
        super().__init__()
        self.stem = OREPAVGGBlock(3, 4)
        self.body = nn.Sequential(DBB(4, 4, act_cfg=dict(type='ReLU')), OREPA1x1(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        logits = self.head(self.body(self.stem(inputs)).mean((2, 3)))
        if mode == 'loss':
            return dict(loss_cls=F.cross_entropy(logits, data_samples))
        if mode == 'predict':
            return logits.argmax(1)
        return logits


def tiny_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(inputs=torch.randn(2, 3, 8, 8, generator=gen),
                data_samples=torch.tensor([0, 1]))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = TinyModel()
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=seed)
    randomize_bn(model, seed=seed + 1)
    return model


def test_config_builds_the_model_itself_with_the_term():
    plain = tiny_model()
    model = MODELS.build(dict(type='mmreparam.EquivalentKernelL2', model=tiny_model(),
                              weight=0.1))
    assert type(model) is TinyModel
    assert isinstance(model.equivalent_kernel_l2, EquivalentKernelL2Loss)
    assert model.state_dict().keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)

    data = tiny_data()
    losses, ref = model(**data, mode='loss'), plain(**data, mode='loss')
    assert set(losses) == {'loss_cls', 'loss_eq_l2'}
    assert torch.equal(losses['loss_cls'], ref['loss_cls'])
    l2 = equivalent_kernel_l2(plain)
    assert l2 > 0
    assert torch.allclose(losses['loss_eq_l2'], 0.1 * l2, rtol=1e-6, atol=0)
    # Gradients: those of the task loss plus 0.1 * those of sum ||K||^2.
    sum(losses.values()).backward()
    (ref['loss_cls'] + 0.1 * equivalent_kernel_l2(plain)).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    # Other modes are untouched.
    with torch.no_grad():
        assert torch.equal(model(data['inputs']), plain(data['inputs']))
        assert torch.equal(model(data['inputs'], mode='predict'),
                           plain(data['inputs'], mode='predict'))


def test_train_step_logs_and_sums_the_term():
    model = regularizers.with_equivalent_kernel_l2(tiny_model(), weight=0.5)
    model.eval()  # the running statistics, which the kernels use, stay as they are
    expected = 0.5 * equivalent_kernel_l2(model).item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    log_vars = model.train_step(tiny_data(), optim)
    assert set(log_vars) == {'loss', 'loss_cls', 'loss_eq_l2'}
    assert log_vars['loss_eq_l2'].item() == pytest.approx(expected, rel=1e-6)
    assert log_vars['loss'].item() == pytest.approx(
        log_vars['loss_cls'].item() + log_vars['loss_eq_l2'].item(), rel=1e-6)
    assert not torch.equal(before['stem.rbr_dense.vector'], model.stem.rbr_dense.vector)


def test_zero_weight_is_a_no_op(monkeypatch):
    plain, model = tiny_model(), regularizers.with_equivalent_kernel_l2(tiny_model(),
                                                                       weight=0)

    def fail(_):
        raise AssertionError('computed with weight=0')

    monkeypatch.setattr(regularizers, 'equivalent_kernel_l2', fail)
    data = tiny_data()
    losses, ref = model(**data, mode='loss'), plain(**data, mode='loss')
    assert losses.keys() == ref.keys() == {'loss_cls'}
    assert torch.equal(losses['loss_cls'], ref['loss_cls'])
    optims = [OptimWrapper(torch.optim.SGD(m.parameters(), lr=0.1)) for m in (model, plain)]
    assert model.train_step(data, optims[0]).keys() == {'loss', 'loss_cls'}
    plain.train_step(data, optims[1])
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_copies_compute_the_term_on_their_own_weights():
    model = regularizers.with_equivalent_kernel_l2(tiny_model(), weight=1.0)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            clone.body[1].weight_or1x1_origin.mul_(3)
        losses = clone(**tiny_data(), mode='loss')
        assert torch.allclose(losses['loss_eq_l2'], equivalent_kernel_l2(clone), rtol=1e-6)
        assert not torch.allclose(losses['loss_eq_l2'], equivalent_kernel_l2(model))
        assert len(clone._forward_hooks) == 1
    folded = mmreparam.fold(model)
    assert folded(**tiny_data(), mode='loss')['loss_eq_l2'].item() == 0


@pytest.mark.parametrize('kwargs,error', [
    (dict(weight=-1e-4), ValueError), (dict(weight=float('nan')), ValueError),
    (dict(weight=True), ValueError), (dict(weight='1e-4'), ValueError),
    (dict(loss_name='eq_l2'), ValueError)])
def test_invalid_arguments(kwargs, error):
    with pytest.raises(error):
        EquivalentKernelL2Loss(**kwargs)


def test_attach_once_and_no_silent_key_collision():
    model = regularizers.with_equivalent_kernel_l2(tiny_model())
    with pytest.raises(ValueError, match='once'):
        EquivalentKernelL2Loss().attach(model)
    clash = regularizers.with_equivalent_kernel_l2(tiny_model(), loss_name='loss_cls')
    with pytest.raises(KeyError, match='loss_cls'):
        clash(**tiny_data(), mode='loss')


# --- From a config, in a real mmengine run (mmpretrain classifier, FoldHook) -------------

@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.RandomState(0)
    for c, name in enumerate(('a', 'b')):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = rng.randint(0, 60, (16, 16, 3)) + 60 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f'{i}.png')
    return root


def test_runner_from_config_trains_with_the_term_and_exports(image_folder, tmp_path):
    pytest.importorskip('mmpretrain')
    classifier = dict(
        type='ImageClassifier',
        data_preprocessor=dict(num_classes=2, mean=[127.5] * 3, std=[60.0] * 3),
        backbone=dict(type='mmreparam.RepVGG', reparam='OREPA_VGG', out_indices=(3, ),
                      arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.125] * 4)),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=2, in_channels=64,
                  loss=dict(type='CrossEntropyLoss')))
    loader = dict(batch_size=2, num_workers=0,
                  sampler=dict(type='InfiniteSampler', shuffle=True),
                  dataset=dict(type='CustomDataset', data_root=str(image_folder),
                               with_label=True,
                               pipeline=[dict(type='LoadImageFromFile'),
                                         dict(type='PackInputs')]))
    cfg = Config(dict(
        default_scope='mmpretrain', work_dir=str(tmp_path),
        model=dict(type='mmreparam.EquivalentKernelL2', model=classifier, weight=1e-3),
        train_dataloader=loader, train_cfg=dict(by_epoch=False, max_iters=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, weight_decay=1e-4),
                           paramwise_cfg=dict(custom_keys={'backbone': dict(decay_mult=0.)})),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1), checkpoint=None),
        custom_hooks=[dict(type='mmreparam.FoldHook', check_batch=False)],
        randomness=dict(seed=0)))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert type(runner.model).__name__ == 'ImageClassifier'
    logged = runner.message_hub.get_scalar('train/loss_eq_l2').current()
    assert logged > 0  # (mmpretrain names its own loss 'loss': the total overwrites it)
    backbone_groups = [g for g in runner.optim_wrapper.param_groups
                       if any(p is q for p in g['params']
                              for q in runner.model.backbone.parameters())]
    assert backbone_groups and all(g['weight_decay'] == 0 for g in backbone_groups)

    # The exported pair still loads strictly: the term adds no state.
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    dcfg = Config.fromfile(str(tmp_path / 'deploy_config.py'))
    assert dcfg.model.model.backbone.deploy is True
    deploy = PRETRAIN_MODELS.build(dcfg.model)
    state = torch.load(tmp_path / 'deploy.pth', map_location='cpu', weights_only=True)
    deploy.load_state_dict(state['state_dict'], strict=True)
    assert equivalent_kernel_blocks(deploy) == []


# --- Configs with a top-level data_preprocessor (every mmseg / mmpretrain config) ---------

ROOT = __import__('pathlib').Path(__file__).resolve().parents[2]
WRAP = '''_base_ = './model.py'
model = dict(_delete_=True, type='mmreparam.EquivalentKernelL2', weight=5e-5,
             model={{_base_.model}})
'''


def runner_of_wrapped(tmp_path, model_config):
    """Runner.from_cfg of ``model_config`` wrapped as the README shows."""
    (tmp_path / 'model.py').write_text(model_config)
    (tmp_path / 'wrapped.py').write_text(WRAP)
    cfg = Config.fromfile(str(tmp_path / 'wrapped.py'))
    assert 'data_preprocessor' in cfg and 'data_preprocessor' not in cfg.model
    cfg.work_dir = str(tmp_path / 'work')
    # A unique experiment name: mmengine keys its DefaultScope by it (file name + a timestamp
    # in seconds), so two tests within one second would share the first one's scope.
    cfg.experiment_name = tmp_path.name
    return Runner.from_cfg(cfg)  # adds cfg.data_preprocessor to the wrapper's dict


def test_runner_passes_the_top_level_data_preprocessor_through_the_wrapper(tmp_path):
    """The demo's mmseg config: its model has its own data_preprocessor, which wins."""
    pytest.importorskip('mmseg')
    runner = runner_of_wrapped(tmp_path, f'''
_base_ = '{ROOT}/configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py'
model = dict(data_preprocessor=dict(size=(96, 96)), backbone=dict(depth=18, base_channels=8),
             decode_head=dict(in_channels=64, channels=8),
             auxiliary_head=dict(in_channels=32, channels=8))
''')
    model = runner.model
    assert type(model).__name__ == 'EncoderDecoder'
    assert isinstance(model.equivalent_kernel_l2, EquivalentKernelL2Loss)
    assert type(model.data_preprocessor).__name__ == 'SegDataPreProcessor'
    assert tuple(model.data_preprocessor.size) == (96, 96)  # the model's own
    data = model.data_preprocessor(dict(
        inputs=[torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8) for _ in range(2)],
        data_samples=[_seg_sample(96) for _ in range(2)]), True)
    losses = model(**data, mode='loss')
    assert losses['loss_eq_l2'] > 0 and 'decode.loss_ce' in losses


def _seg_sample(size):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.zeros(1, size, size,
                                                                 dtype=torch.long)))
    sample.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                             pad_shape=(size, size)))
    return sample


def test_runner_gives_an_mmpretrain_classifier_the_top_level_data_preprocessor(tmp_path):
    """mmpretrain's configs put data_preprocessor at the top only: it must reach the
    classifier (mean / std / num_classes), as it does without the wrapper."""
    pytest.importorskip('mmpretrain')
    runner = runner_of_wrapped(tmp_path, '''
default_scope = 'mmpretrain'
data_preprocessor = dict(num_classes=2, mean=[10., 20., 30.], std=[2., 3., 4.])
model = dict(type='ImageClassifier',
             backbone=dict(type='mmreparam.RepVGG', reparam='OREPA_VGG', out_indices=(3, ),
                           arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.125] * 4)),
             neck=dict(type='GlobalAveragePooling'),
             head=dict(type='LinearClsHead', num_classes=2, in_channels=64,
                       loss=dict(type='CrossEntropyLoss')))
''')
    preprocessor = runner.model.data_preprocessor
    assert type(preprocessor).__name__ == 'ClsDataPreprocessor'
    assert preprocessor.mean.flatten().tolist() == [10., 20., 30.]
    assert preprocessor.std.flatten().tolist() == [2., 3., 4.]
