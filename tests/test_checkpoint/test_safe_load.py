"""mmengine checkpoints reload under weights_only=True once mmreparam is imported; crafted
pickles and broken files are refused with a clear error."""
import os
import pickle
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch

RUNNER_SCRIPT = '''
import sys, torch, torch.nn as nn
from torch.utils.data import Dataset
from mmengine.model import BaseModel
from mmengine.runner import Runner
if {import_mmreparam}:
    import mmreparam
from mmreparam_toy import Toy, ToyData
work_dir, max_iters, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'resume'
runner = Runner(
    model=Toy(), work_dir=work_dir,
    train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                          sampler=dict(type='DefaultSampler', shuffle=False)),
    train_cfg=dict(by_epoch=False, max_iters=max_iters),
    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
    default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                       logger=dict(type='LoggerHook', interval=1)),
    resume=resume, default_scope=None)
runner.train()
print('ITER', runner.iter)
'''

TOY_MODULE = '''
import torch, torch.nn as nn
from torch.utils.data import Dataset
from mmengine.model import BaseModel


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), target=torch.tensor(float(i)))


class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs, target, mode='loss'):
        out = self.bn(self.conv(torch.stack(inputs) if isinstance(inputs, list) else inputs))
        loss = (out.mean(dim=(1, 2, 3)) - torch.stack(target) * 0).square().mean()
        return dict(loss=loss)
'''


def run(script, tmp_path, *args):
    (tmp_path / 'mmreparam_toy.py').write_text(TOY_MODULE)
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    return subprocess.run([sys.executable, '-c', textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)


@pytest.mark.parametrize('written_with_mmreparam', [False, True])
def test_mmengine_checkpoint_reloads_and_resumes(tmp_path, written_with_mmreparam):
    work = tmp_path / 'work'
    res = run(RUNNER_SCRIPT.format(import_mmreparam=written_with_mmreparam), tmp_path, work,
              2, 'fresh')
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = work / 'iter_2.pth'
    assert ckpt.exists()

    load = 'import sys, torch\n{imp}\nckpt = torch.load(sys.argv[1])\n' \
           'print(type(ckpt["message_hub"]["log_scalars"]["train/loss"]).__name__)'
    # Without mmreparam, torch >= 2.6 refuses mmengine's own checkpoint (the bug; before
    # 2.6 torch.load does not default to weights_only and loads it) ...
    plain = run(load.format(imp=''), tmp_path, ckpt)
    if TORCH_DEFAULTS_TO_WEIGHTS_ONLY:
        assert plain.returncode != 0 and 'HistoryBuffer' in plain.stderr
    else:
        assert plain.returncode == 0, plain.stderr[-3000:]
    # ... with mmreparam imported it loads, weights_only still on.
    fixed = run(load.format(imp='import mmreparam'), tmp_path, ckpt)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert fixed.stdout.strip() == 'HistoryBuffer'

    # --resume through mmengine's Runner continues from iteration 2.
    res = run(RUNNER_SCRIPT.format(import_mmreparam=True), tmp_path, work, 4, 'resume')
    assert res.returncode == 0, res.stderr[-3000:]
    assert 'ITER 4' in res.stdout
    assert 'resumed' in (res.stdout + res.stderr).lower()


class _SystemPayload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f'touch {self.path}', )


class _GetattrPayload:
    # getattr(HistoryBuffer, '__init__') is the first step towards its __globals__.
    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer
        return getattr, (HistoryBuffer, '__init__')


TORCH_DEFAULTS_TO_WEIGHTS_ONLY = tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 6)


@pytest.fixture(params=['weights_only', 'allow_list_unpickler'])
def loader(request, monkeypatch):
    """safe_load as on this torch, and as before torch 2.4 (no add_safe_globals: its own
    allow-list unpickler), so both paths are checked on any torch."""
    if request.param == 'weights_only':
        if not hasattr(torch.serialization, 'add_safe_globals'):
            pytest.skip('torch < 2.4 has no weights_only allow-list to extend')
    else:
        monkeypatch.delattr(torch.serialization, 'add_safe_globals', raising=False)
    return request.param


def test_code_running_pickles_are_refused(tmp_path, loader):
    import mmreparam  # noqa: F401  (installs the allow-list)
    from mmreparam.checkpoint import UnsafeCheckpointError, safe_load
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'x': _SystemPayload(marker)}, evil)
    with pytest.raises(UnsafeCheckpointError, match='not allowed'):
        safe_load(evil)
    if TORCH_DEFAULTS_TO_WEIGHTS_ONLY:
        # mmengine's own loads (torch's default weights_only=True) refuse it too.
        from mmengine.runner import CheckpointLoader
        with pytest.raises(pickle.UnpicklingError):
            CheckpointLoader.load_checkpoint(str(evil), map_location='cpu')
    assert not marker.exists()

    sneaky = tmp_path / 'getattr.pth'
    torch.save({'x': _GetattrPayload()}, sneaky)
    with pytest.raises(UnsafeCheckpointError, match='getattr'):
        safe_load(sneaky)


def test_mmengine_state_loads_through_either_path(tmp_path, loader):
    from mmengine.logging.history_buffer import HistoryBuffer

    from mmreparam.checkpoint import safe_load
    history = HistoryBuffer()
    for value in (1.0, 3.0):
        history.update(value)
    path = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': OrderedDict(w=torch.ones(2)), 'meta': {'seed': np.int64(3)},
                'message_hub': {'log_scalars': {'loss': history}},
                'array': np.arange(3, dtype=np.float32)}, path)
    ckpt = safe_load(path)
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    assert ckpt['message_hub']['log_scalars']['loss'].mean() == 2.0
    assert ckpt['meta']['seed'] == 3 and ckpt['array'].tolist() == [0, 1, 2]


def test_broken_files_get_one_clear_error(tmp_path, loader):
    from mmreparam.checkpoint import CheckpointError, safe_load
    good = tmp_path / 'good.pth'
    torch.save({'state_dict': {'w': torch.ones(100, 100)}}, good)
    assert torch.equal(safe_load(good)['state_dict']['w'], torch.ones(100, 100))

    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    not_ckpt = tmp_path / 'notes.pth'
    not_ckpt.write_text('this is not a checkpoint\n' * 10)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    for path in (truncated, not_ckpt, empty):
        with pytest.raises(CheckpointError, match=path.name):
            safe_load(path)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        safe_load(tmp_path / 'missing.pth')
    with pytest.raises(CheckpointError, match='directory'):
        safe_load(tmp_path)
