"""Helpers shared by the test files (import as ``from helpers import ...``: pytest puts
``tests/`` on ``sys.path`` for its ``conftest.py``). Fixtures live in ``conftest.py``; what
users checking their own blocks may want lives in :mod:`mmreparam.testing`."""
import copy
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from mmreparam.models.layers.factory import REPARAM_TYPES, reparam_block_type
from mmreparam.testing import default_dtype, randomize_bn, randomize_parameters

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
#: What a float64 load, expansion or fold must reproduce (relative to the largest output).
MAX_REL_ERROR = 1e-10


# ------------------------------------------------------------------------------------------
# Block types


def reparam_types():
    """Every ``reparam=`` name a backbone takes, sorted: parametrize over this, never a typed
    list, so that a new block type is tested wherever the others are."""
    return sorted(REPARAM_TYPES)


def reparam_block_types():
    """The block class of each of :func:`reparam_types` for a 3x3 convolution (``ConvBN``
    for ``'base'``)."""
    return [reparam_block_type(name, 3) for name in reparam_types()]


# ------------------------------------------------------------------------------------------
# Exact (float64) comparisons


def float64_default():
    """Build in float64, so that helper buffers (OREPA's prior) are float64-accurate."""
    return default_dtype(F64)


def image(seed=0, size=32, batch=1):
    """A seeded float64 image batch ``(batch, 3, size, size)``."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=F64)


def run(model, x):
    """The model's outputs (a list), without autograd."""
    with torch.no_grad():
        return list(model(x))


def max_rel_error(outputs, reference):
    """The largest absolute difference over all outputs, relative to the largest reference
    value."""
    diff = max((a - b).abs().max().item() for a, b in zip(outputs, reference))
    return diff / max(b.abs().max().item() for b in reference)


def check(name, outputs, reference, tolerance=MAX_REL_ERROR):
    """Assert that ``outputs`` reproduce ``reference`` (as many, within ``tolerance``)."""
    assert len(outputs) == len(reference)
    error = max_rel_error(outputs, reference)
    print(f'[exact] {name}: max relative error {error:.1e}')
    assert error <= tolerance, f'{name}: {error}'


def pretrained(backbone, checkpoint, **kwargs):
    """Build a backbone with ``init_cfg=Pretrained`` (``prefix`` if given) in float64,
    initialise it, eval mode."""
    init_cfg = dict(type='Pretrained', checkpoint=str(checkpoint))
    if 'prefix' in kwargs:
        init_cfg['prefix'] = kwargs.pop('prefix')
    with float64_default():
        model = backbone(init_cfg=init_cfg, **kwargs)
    model.init_weights()
    return model.eval()


def torchvision_features(net, x):
    """The four stage outputs of a torchvision ResNet (what our backbones return)."""
    with torch.no_grad():
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        outs = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            y = layer(y)
            outs.append(y)
    return outs


# ------------------------------------------------------------------------------------------
# Checkpoints written without mmreparam


class Rand:
    """Seeded float64 tensors for checkpoints written without mmreparam."""

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
    """``state`` with ``prefix`` before every key."""
    return {prefix + key: value for key, value in state.items()}


def sub(state, prefix):
    """The entries of ``state`` under ``prefix``, the prefix removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def official_resnet_keys(state):
    """An mmreparam ResNet state in the official OREPA_CVPR2022 / DBB names (``stem.`` ->
    ``stage0.conv1.``, ``layer<i>.`` -> ``stage<i>.``, ``downsample.0.`` -> ``shortcut.``)."""
    out = {}
    for key, value in state.items():
        key = key.replace('stem.', 'stage0.conv1.', 1)
        for i in range(1, 5):
            key = key.replace(f'layer{i}.', f'stage{i}.', 1)
        out[key.replace('downsample.0.', 'shortcut.')] = value
    return out



# ------------------------------------------------------------------------------------------
# Tools and config texts


def load_tool(name):
    """Import ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool(name, *args, cwd=ROOT):
    """Run ``tools/<name>`` like a user would; return its output; fail with its log."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / name), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f'tools/{name} failed:\n{proc.stdout[-3000:]}\n' \
        f'{proc.stderr[-5000:]}'
    return proc.stdout + proc.stderr


#: The small Faster R-CNN (OREPA-R18 at width 8) that the tests train, fold and quantize in
#: place of the demo config's R50; append it to a config text based on that config.
TINY_FASTER_RCNN = '''model = dict(
    backbone=dict(depth=18, base_channels=8),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16),
                  bbox_head=dict(in_channels=16, fc_out_channels=32)))
'''

#: The small PSPNet (OREPA-R18 at width 8, 96-pixel inputs) in place of the demo config's.
TINY_PSPNET = '''model = dict(
    data_preprocessor=dict(size=(96, 96)),
    backbone=dict(depth=18, base_channels=8),
    decode_head=dict(in_channels=64, channels=8),
    auxiliary_head=dict(in_channels=32, channels=8))
'''

#: Config lines that point a configs/demo detection config at the generated data set of the
#: ``data`` fixture (in tests/test_tools/conftest.py); ``.format(data=...)`` them.
GENERATED_DET_DATA = '''data_root = '{data}/det/'
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
'''

#: The same for a configs/demo segmentation config.
GENERATED_SEG_DATA = '''data_root = '{data}/seg/'
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
'''


def short_schedule(iters, checkpoint_interval):
    """Config lines for a run of ``iters`` iterations (validated at its end), a checkpoint
    every ``checkpoint_interval`` and a log line every iteration."""
    return (f'train_cfg = dict(max_iters={iters}, val_interval={iters})\n'
            'param_scheduler = [dict(type=\'LinearLR\', start_factor=0.5, by_epoch=False, '
            'begin=0, end=2)]\n'
            f'default_hooks = dict(checkpoint=dict(interval={checkpoint_interval}), '
            'logger=dict(interval=1))\n')


# ------------------------------------------------------------------------------------------
# Models inside the toolboxes


def build(tmp_path, text, scope):
    """The model of config ``text`` (written to ``tmp_path/cfg.py``) built in ``scope``
    ('mmdet', 'mmseg' or 'mmpretrain'), initialised, with random branch scales and BN."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    init_default_scope(scope)
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    elif scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=1)
    randomize_bn(model, seed=2)
    return model


def pspnet_config(backbone, aux_channels, channels):
    """A config text of mmseg's PSPNet (64-pixel crops, 4 classes, 16-channel heads) around
    ``backbone`` (a dict), whose last two stages give ``aux_channels`` and ``channels``."""
    return f'''
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(_delete_=True, **{backbone!r}),
    decode_head=dict(in_channels={channels}, channels=16, norm_cfg=norm_cfg, num_classes=4),
    auxiliary_head=dict(in_channels={aux_channels}, channels=16, norm_cfg=norm_cfg,
                        num_classes=4))
'''


def seg_batch(size=64, num_classes=4, batch=2):
    """Inputs and segmentation data samples for a train step of an mmseg model."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    data_samples = []
    for _ in range(batch):
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, size, size)))
        data_samples.append(sample)
    return dict(inputs=[torch.randint(0, 255, (3, size, size), dtype=torch.uint8)] * batch,
                data_samples=data_samples)


def check_train_step_and_fold(model, data, loss_keys):
    """A training step reaches every backbone parameter and reports one of ``loss_keys``;
    the folded model (returned) has no unfolded block and computes the same (1e-4)."""
    import mmreparam
    model.train()
    batch = model.data_preprocessor(copy.deepcopy(data), True)
    losses = model(**batch, mode='loss')
    loss = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v)
               for k, v in losses.items() if 'loss' in k)
    loss.backward()
    assert any(k in losses for k in loss_keys), list(losses)
    grads = [p.grad for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)

    model.eval()
    folded = mmreparam.fold(model)
    assert not [m for m in folded.modules()
                if isinstance(m, mmreparam.models.layers.ReparamBlock)
                and m.reparam_conv is None]
    batch = model.data_preprocessor(copy.deepcopy(data), False)
    err = mmreparam.fold_error(model, folded,
                               dict(inputs=batch['inputs'],
                                    data_samples=batch['data_samples'], mode='tensor'))
    assert err['max_rel'] < 1e-4, err
    return folded
