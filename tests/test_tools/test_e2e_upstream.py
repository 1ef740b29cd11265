"""End to end with ``mmreparam.Reparameterized``: train -> FoldHook -> the upstream model.

For the configs/demo RTMDet-tiny (OREPA in the CSPNeXt backbone and the PAFPN neck) and
BiSeNetV2 (OREPA in the backbone): a few iterations with tools/train.py on a small generated
data set (96-pixel images), FoldHook writes the upstream deploy pair, and the upstream
toolbox tests it in a process where mmreparam cannot be imported (an import hook refuses it,
and the process checks ``sys.modules`` at its end). Its metrics and predictions equal those of the
train-time checkpoint tested with tools/test.py.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import GENERATED_DET_DATA, GENERATED_SEG_DATA, ROOT, short_schedule, tool
from PIL import Image

DET_CFG = ("_base_ = '{root}/configs/demo/rtmdet_orepa-tiny_200i_synthetic.py'\n"
           + GENERATED_DET_DATA + short_schedule(4, 4))

SEG_CFG = ("_base_ = '{root}/configs/demo/bisenetv2-orepa_fcn_200i_synthetic.py'\n"
           + GENERATED_SEG_DATA + 'model = dict(data_preprocessor=dict(size=(96, 96)))\n'
           + short_schedule(2, 2))

# The upstream test, as mmdet's / mmseg's tools/test.py runs it (those scripts are not in
# the wheels): Runner.from_cfg(cfg).test() in the config's default scope, --out as theirs.
# mmreparam is made unimportable first, as in an environment without it.
UPSTREAM_TEST = '''
import importlib.abc
import json
import sys


class NoMmreparam(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'mmreparam' or name.startswith('mmreparam.'):
            raise ModuleNotFoundError(f'No module named {{name!r}} (refused by the test)')
        return None


sys.meta_path.insert(0, NoMmreparam())
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

cfg = Config.fromfile({config!r})
cfg.work_dir = {work_dir!r}
cfg.load_from = {checkpoint!r}
if cfg.default_scope == 'mmseg':
    cfg.test_evaluator['output_dir'] = {out!r}
    cfg.test_evaluator['keep_results'] = True
runner = Runner.from_cfg(cfg)
if cfg.default_scope == 'mmdet':
    from mmdet.evaluation import DumpDetResults
    runner.test_evaluator.metrics.append(DumpDetResults(out_file_path={out!r}))
metrics = runner.test()
with open({metrics_json!r}, 'w') as f:
    json.dump({{k: float(v) for k, v in metrics.items()}}, f, indent=2)
loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'mmreparam')
assert not loaded, loaded
print('mmreparam in sys.modules:', 'mmreparam' in sys.modules)
'''


def upstream_test(tmp_path, work, out):
    """Test ``work``'s upstream deploy pair in a process without mmreparam; its metrics."""
    script = tmp_path / 'upstream_test.py'
    metrics_json = tmp_path / 'upstream.json'
    script.write_text(UPSTREAM_TEST.format(
        config=str(work / 'deploy_config.py'), checkpoint=str(work / 'deploy.pth'),
        work_dir=str(tmp_path / 'upstream'), out=str(out), metrics_json=str(metrics_json)))
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert 'mmreparam in sys.modules: False' in log
    return json.loads(metrics_json.read_text())


def train_and_fold(tmp_path, cfg_text, data, parts):
    """tools/train.py with FoldHook; the deploy pair is the upstream one, loaded strict."""
    cfg = tmp_path / 'train.py'
    cfg.write_text(cfg_text.format(root=ROOT, data=data))
    work = tmp_path / 'work'
    log = tool('train.py', cfg, '--work-dir', work)
    assert 'FoldHook: fold error on a validation batch' in log
    for part in parts:
        assert f'{part}: mmreparam.Reparameterized -> ' in log
    deploy_text = (work / 'deploy_config.py').read_text()
    assert 'mmreparam' not in deploy_text and 'custom_imports' not in deploy_text
    meta = torch.load(work / 'deploy.pth', map_location='cpu', weights_only=True)['meta']
    assert meta['deploy_form'] == 'upstream' and meta['fold_error']['max_rel'] < 1e-4
    return cfg, work


@pytest.mark.slow
def test_rtmdet_orepa_trains_folds_and_tests_as_upstream_mmdet(tmp_path, data):
    cfg, work = train_and_fold(tmp_path, DET_CFG, data, ('backbone', 'neck'))
    deploy_cfg = (work / 'deploy_config.py').read_text()
    assert "type='CSPNeXt'" in deploy_cfg and "type='CSPNeXtPAFPN'" in deploy_cfg
    tool('test.py', cfg, work / 'iter_4.pth', '--work-dir', tmp_path / 'train_test', '--out',
         tmp_path / 'train.pkl', '--metrics-json', tmp_path / 'train.json')
    after = upstream_test(tmp_path, work, tmp_path / 'upstream.pkl')
    before = json.loads((tmp_path / 'train.json').read_text())
    assert before == after and 'coco/bbox_mAP' in before
    preds = [pickle.loads((tmp_path / f).read_bytes()) for f in ('train.pkl', 'upstream.pkl')]
    assert len(preds[0]) == len(preds[1]) == 4
    for a, b in zip(*preds):
        pa, pb = a['pred_instances'], b['pred_instances']
        assert len(pa['scores']) == len(pb['scores']) > 0
        assert torch.allclose(pa['scores'], pb['scores'], atol=1e-4)
        assert torch.allclose(pa['bboxes'], pb['bboxes'], atol=1e-2)


def test_bisenetv2_orepa_trains_folds_and_tests_as_upstream_mmseg(tmp_path, data):
    cfg, work = train_and_fold(tmp_path, SEG_CFG, data, ('backbone', ))
    assert "type='BiSeNetV2'" in (work / 'deploy_config.py').read_text()
    tool('test.py', cfg, work / 'iter_2.pth', '--work-dir', tmp_path / 'train_test', '--out',
         tmp_path / 'train_out', '--metrics-json', tmp_path / 'train.json')
    after = upstream_test(tmp_path, work, tmp_path / 'upstream_out')
    before = json.loads((tmp_path / 'train.json').read_text())
    assert before == after and 'mIoU' in before
    masks = sorted((tmp_path / 'train_out').glob('*.png'))
    assert len(masks) == 4
    for path in masks:
        a = np.array(Image.open(path))
        b = np.array(Image.open(tmp_path / 'upstream_out' / path.name))
        assert (a == b).mean() > 0.999
