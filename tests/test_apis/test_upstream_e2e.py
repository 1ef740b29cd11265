"""The upstream deploy pair of the demo detector, the demo segmentor and a classifier runs in
a process that never imports mmreparam, and computes what the folded model computes."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import mmreparam
from mmreparam.apis.deploy import export_deploy
from mmreparam.cli.model import build_model
from mmreparam.testing import randomize_bn, randomize_parameters

ROOT = Path(__file__).resolve().parents[2]

#: The outputs compared, as source run both here and in the upstream-only process.
FORWARD = '''
def forward(model, kind, x):
    """The tensors a model computes: features and RPN maps (detector), logits (others)."""
    with torch.no_grad():
        if kind == 'det':
            feats = model.extract_feat(x)
            outs = list(feats)
            for level in model.rpn_head(feats):
                outs += list(level)
            return outs
        out = model(x, mode='tensor')
        return list(out) if isinstance(out, (list, tuple)) else [out]
'''
_namespace = dict(torch=torch)
exec(FORWARD, _namespace)  # the same forward() here
forward = _namespace['forward']

UPSTREAM_ONLY = FORWARD + '''
import importlib
import sys

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

scope, kind, *out_dirs = sys.argv[1:]
init_default_scope(scope)
for out_dir in out_dirs:
    cfg = Config.fromfile(f'{out_dir}/deploy_config.py')
    model = importlib.import_module(f'{scope}.registry').MODELS.build(cfg.model)
    ckpt = torch.load(f'{out_dir}/deploy.pth', map_location='cpu', weights_only=True)
    x = torch.load(f'{out_dir}/inputs.pth', map_location='cpu', weights_only=True)
    model.to(x.dtype)  # before loading: a float64 state must not pass through float32
    model.load_state_dict(ckpt['state_dict'], strict=True)
    model.eval()
    torch.save(forward(model, kind, x), f'{out_dir}/outputs.pth')
loaded = sorted(m for m in sys.modules if m == 'mmreparam' or m.startswith('mmreparam.'))
assert not loaded, loaded
print('upstream-only process: no mmreparam module loaded')
'''


def demo_det():
    cfg = Config.fromfile(str(ROOT / 'configs/demo/faster-rcnn_orepa-r50_fpn_200i_synthetic.py'))
    cfg.model.backbone.base_channels = 8
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    return cfg, 'mmdet', 'det', 'ResNet'


def demo_seg():
    cfg = Config.fromfile(str(ROOT / 'configs/demo/pspnet_orepa-r50-d8_200i_synthetic.py'))
    cfg.model.backbone.base_channels = 8
    cfg.model.decode_head.update(in_channels=256, channels=16)
    cfg.model.auxiliary_head.update(in_channels=128, channels=8)
    return cfg, 'mmseg', 'seg', 'ResNetV1c'


def classifier():
    cfg = Config(dict(default_scope='mmpretrain', model=dict(
        type='ImageClassifier',
        backbone=dict(type='mmreparam.RepVGG', arch='A0', reparam='OREPA_VGG',
                      base_channels=16),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=320,
                  loss=dict(type='CrossEntropyLoss')))))
    return cfg, 'mmpretrain', 'cls', 'RepVGG'


def run_without_mmreparam(out_dirs, scope, kind):
    """Build, load and run each deploy pair in one process that has only the upstream
    packages imported; return the outputs of each."""
    proc = subprocess.run([sys.executable, '-c', UPSTREAM_ONLY, scope, kind,
                           *map(str, out_dirs)], cwd=out_dirs[0].parent, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert 'no mmreparam module loaded' in proc.stdout
    return [torch.load(d / 'outputs.pth', map_location='cpu', weights_only=True)
            for d in out_dirs]


@pytest.mark.parametrize('case', [
    pytest.param(demo_det, marks=pytest.mark.slow),
    pytest.param(demo_seg, marks=pytest.mark.slow),
    classifier,
])
def test_upstream_pair_runs_without_mmreparam(case, tmp_path):
    cfg, scope, kind, backbone_type = case()
    model = build_model(cfg)
    randomize_parameters(model, ('vector', 'idconv1.weight'), seed=1)
    randomize_bn(model, seed=2).eval()
    cases = {}
    for dtype in (torch.float32, torch.float64):
        out_dir = tmp_path / str(dtype).split('.')[-1]
        folded = mmreparam.fold(copy.deepcopy(model).to(dtype))
        paths = export_deploy(folded, cfg, str(out_dir))
        assert paths['form'] == 'upstream', paths['why']
        written = Config.fromfile(paths['config'])
        assert written.model.backbone.type == backbone_type
        assert 'mmreparam' not in Path(paths['config']).read_text()
        x = torch.randn(1, 3, 64, 64, dtype=dtype, generator=torch.Generator().manual_seed(3))
        torch.save(x, out_dir / 'inputs.pth')
        cases[out_dir] = forward(folded, kind, x)
    outputs = run_without_mmreparam(list(cases), scope, kind)
    for (out_dir, expected), got in zip(cases.items(), outputs):
        dtype, tolerance = expected[0].dtype, dict(float32=1e-5, float64=1e-10)[out_dir.name]
        assert len(got) == len(expected)
        for a, b in zip(expected, got):
            assert b.dtype == dtype
            assert (a - b).abs().max() <= tolerance * a.abs().max(), dtype
