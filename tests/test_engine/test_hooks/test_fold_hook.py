"""FoldHook inside a real mmengine run (an mmpretrain classifier on a tiny image folder)."""
import logging

import numpy as np
import pytest
import torch
from helpers import load_tool
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image

import mmreparam
from mmreparam.apis.deploy import atomic_write, deploy_config, save_checkpoint_atomic
from mmreparam.engine.hooks import fold_hook as fold_hook_module

CLASSES = ('a', 'b', 'c')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('folder')
    rng = np.random.RandomState(0)
    for split in ('train', 'val'):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = rng.randint(0, 60, (32, 32, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


def classifier_cfg(root, work_dir, max_iters=4, hooks=(), **kwargs):
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    loader = lambda split, shuffle: dict(  # noqa: E731
        batch_size=4, num_workers=0,
        sampler=dict(type='InfiniteSampler' if shuffle else 'DefaultSampler',
                     shuffle=shuffle),
        dataset=dict(type='CustomDataset', data_root=str(root / split), pipeline=pipeline,
                     with_label=True))
    return Config(dict(
        default_scope='mmpretrain',
        work_dir=str(work_dir),
        model=dict(type='ImageClassifier',
                   data_preprocessor=dict(num_classes=3, mean=[127.5] * 3, std=[60.0] * 3),
                   backbone=dict(type='mmreparam.ResNet', depth=18, reparam='OREPA',
                                 base_channels=8, out_indices=(3, ), norm_eval=False),
                   neck=dict(type='GlobalAveragePooling'),
                   head=dict(type='LinearClsHead', num_classes=3, in_channels=64,
                             loss=dict(type='CrossEntropyLoss'))),
        train_dataloader=loader('train', True),
        val_dataloader=loader('val', False),
        test_dataloader=loader('val', False),
        val_evaluator=dict(type='Accuracy', topk=(1, )),
        test_evaluator=dict(type='Accuracy', topk=(1, )),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters),
        val_cfg=dict(), test_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                           interval=2),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        randomness=dict(seed=0),
        **kwargs))


def predictions(model, root):
    files = sorted((root / 'val').rglob('*.png'))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    batch = model.data_preprocessor(dict(inputs=list(x)), False)
    model.eval()
    with torch.no_grad():
        return model(batch['inputs'], mode='tensor')


def test_fold_hook_exports_ema_weights_and_leaves_training_intact(image_folder, tmp_path):
    hooks = [dict(type='EMAHook', momentum=0.5), dict(type='mmreparam.FoldHook')]
    runner = Runner.from_cfg(classifier_cfg(image_folder, tmp_path, hooks=hooks))
    runner.train()
    fold_hook = [h for h in runner.hooks if isinstance(h, mmreparam.FoldHook)][0]
    assert fold_hook.last_fold_error['max_rel'] < 1e-5

    # The live model is still the train-time one.
    live = runner.model
    assert any('weight_orepa_origin' in k for k in live.state_dict())
    assert not any('reparam_conv' in k for k in live.state_dict())

    # deploy_config.py is the upstream model (mmpretrain's ResNet, no mmreparam type) and
    # loads deploy.pth strictly ...
    dcfg = Config.fromfile(str(tmp_path / 'deploy_config.py'))
    assert dcfg.model.backbone.type == 'ResNet' and 'mmreparam' not in dcfg.pretty_text
    assert not any(str(h['type']).endswith('FoldHook') for h in dcfg.custom_hooks)
    from mmpretrain.registry import MODELS
    deploy = MODELS.build(dcfg.model)
    ckpt = torch.load(tmp_path / 'deploy.pth', map_location='cpu', weights_only=True)
    deploy.load_state_dict(ckpt['state_dict'], strict=True)
    assert ckpt['meta']['fold_error']['max_rel'] < 1e-5
    assert ckpt['meta']['deploy_form'] == 'upstream'
    # ... and computes what the last checkpoint (EMA weights) computes.
    trained = MODELS.build(runner.cfg.model)
    state = torch.load(tmp_path / 'iter_4.pth', map_location='cpu')['state_dict']
    trained.load_state_dict(state, strict=True)
    ema = runner.hooks[[type(h).__name__ for h in runner.hooks].index('EMAHook')]
    assert not torch.equal(state['head.fc.weight'], live.state_dict()['head.fc.weight']), \
        'the checkpoint should hold the EMA weights, not the live ones'
    assert torch.allclose(state['head.fc.weight'],
                          ema.ema_model.module.state_dict()['head.fc.weight'])
    ref, out = predictions(trained, image_folder), predictions(deploy, image_folder)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-5)

    # Training resumes (EMA included) from the last checkpoint.
    resumed = Runner.from_cfg(classifier_cfg(image_folder, tmp_path, max_iters=6,
                                             hooks=hooks, resume=True))
    resumed.train()
    assert resumed.iter == 6


def test_fold_for_test_gives_the_same_metrics(image_folder, tmp_path):
    runner = Runner.from_cfg(classifier_cfg(image_folder, tmp_path / 'a', max_iters=2))
    runner.train()
    plain = runner.test()
    cfg = classifier_cfg(image_folder, tmp_path / 'b', max_iters=2,
                         hooks=[dict(type='mmreparam.FoldHook', fold_for_test=True)],
                         load_from=str(tmp_path / 'a' / 'iter_2.pth'))
    tester = Runner.from_cfg(cfg)
    model_before = tester.model
    folded = tester.test()
    assert folded == plain
    assert tester.model is model_before  # restored after the test


def test_deploy_config_sets_deploy_on_every_reparam_part():
    cfg = Config(dict(default_scope='mmseg', model=dict(
        type='EncoderDecoder', pretrained='x.pth',
        backbone=dict(type='mmreparam.ResNet', depth=18,
                      init_cfg=dict(type='Pretrained', checkpoint='in1k.pth')),
        decode_head=dict(type='FCNHead')), load_from='a.pth',
        custom_hooks=[dict(type='mmreparam.FoldHook'), dict(type='EMAHook')]))
    out = deploy_config(cfg)
    assert out.model.backbone.deploy is True and 'init_cfg' not in out.model.backbone
    assert out.model.pretrained is None and out.load_from is None
    assert [h['type'] for h in out.custom_hooks] == ['EMAHook']
    assert 'deploy' not in out.model.decode_head
    assert cfg.model.backbone.get('deploy') is None  # the input is not changed
    with pytest.raises(ValueError, match='nothing to fold'):
        deploy_config(Config(dict(model=dict(type='mmpretrain.ImageClassifier',
                                             backbone=dict(type='mmpretrain.ResNet')))))


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    path = str(tmp_path / 'deploy.pth')
    save_checkpoint_atomic({'v': torch.ones(3)}, path)

    def fail_midway(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise OSError('disk full (injected)')

    with pytest.raises(OSError, match='injected'):
        atomic_write(path, fail_midway)
    assert torch.equal(torch.load(path, weights_only=True)['v'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['deploy.pth']  # no temp file left


def test_every_checkpoint_exports_each_saved_checkpoint(image_folder, tmp_path):
    hook = dict(type='mmreparam.FoldHook', every_checkpoint=True, check_batch=False)
    runner = Runner.from_cfg(classifier_cfg(image_folder, tmp_path, hooks=[hook]))
    runner.train()
    from mmpretrain.registry import MODELS
    deploy = MODELS.build(Config.fromfile(str(tmp_path / 'deploy_config.py')).model)
    for it in (2, 4):
        state = torch.load(tmp_path / f'deploy_iter_{it}.pth', weights_only=True)['state_dict']
        deploy.load_state_dict(state, strict=True)
        trained = MODELS.build(runner.cfg.model)
        trained.load_state_dict(torch.load(tmp_path / f'iter_{it}.pth')['state_dict'])
        assert torch.allclose(predictions(trained, image_folder),
                              predictions(deploy, image_folder), rtol=1e-4, atol=1e-5)
    assert (tmp_path / 'deploy.pth').exists()  # and the final export after training


def test_deploy_form_mmreparam_keeps_mmreparams_form(image_folder, tmp_path):
    hook = dict(type='mmreparam.FoldHook', deploy_form='mmreparam', check_batch=False)
    cfg = classifier_cfg(image_folder, tmp_path, max_iters=2, hooks=[hook])
    runner, records = run_training(cfg)
    dcfg = Config.fromfile(str(tmp_path / 'deploy_config.py'))
    assert dcfg.model.backbone.type == 'mmreparam.ResNet' and dcfg.model.backbone.deploy
    meta = torch.load(tmp_path / 'deploy.pth', weights_only=True)['meta']
    assert meta['deploy_form'] == 'mmreparam'
    assert any("in mmreparam's form, which needs mmreparam to run (deploy_form='mmreparam')"
               in r.getMessage() for r in records.records)
    with pytest.raises(ValueError, match='deploy_form'):
        mmreparam.FoldHook(deploy_form='onnx')


def test_fold_hook_with_a_runner_built_from_objects(image_folder, tmp_path):
    """A Runner given a model object has no model config: deploy.pth only, with a warning."""
    from mmengine.registry import init_default_scope

    from mmreparam.apis.deploy import models_registry
    cfg = classifier_cfg(image_folder, tmp_path, max_iters=2)
    init_default_scope('mmpretrain')
    model = models_registry('mmpretrain').build(cfg.model)
    kwargs = {k: v for k, v in cfg.items() if k not in ('model', 'custom_hooks')}
    runner = Runner(model=model, custom_hooks=[dict(type='mmreparam.FoldHook')], **kwargs)
    runner.train()
    assert (tmp_path / 'deploy.pth').exists() and not (tmp_path / 'deploy_config.py').exists()
    state = torch.load(tmp_path / 'deploy.pth', map_location='cpu', weights_only=True)
    folded = mmreparam.fold(runner.model)
    assert state['state_dict'].keys() == folded.state_dict().keys()


# --- Faults at the end of training: the run finishes, nothing is lost --------------------

class _ForeignNeck(torch.nn.Module):
    """Global pooling with another library's ``switch_to_deploy``: one that raises, or one
    that changes the function (a wrong fold)."""

    def __init__(self, on_deploy='raise'):
        super().__init__()
        self.on_deploy = on_deploy
        self.register_buffer('scale', torch.ones(()))

    def forward(self, inputs):
        return tuple(x.mean((2, 3)) * self.scale for x in inputs)

    def switch_to_deploy(self):
        if self.on_deploy == 'raise':
            raise RuntimeError('switch_to_deploy is broken (injected)')
        self.scale.fill_(1.5)


@pytest.fixture
def foreign_neck():
    from mmpretrain.registry import MODELS
    MODELS.register_module('MmreparamTestForeignNeck', module=_ForeignNeck, force=True)
    yield 'MmreparamTestForeignNeck'
    MODELS._module_dict.pop('MmreparamTestForeignNeck', None)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level):
        return [r.getMessage() for r in self.records
                if r.levelno == level and 'FoldHook' in r.getMessage()]


def run_training(cfg, expect=None):
    """Train from a config file (as the tools do); return the runner and the log records."""
    runner = Runner.from_cfg(cfg)
    records = _Records()
    runner.logger.addHandler(records)
    try:
        if expect is None:
            runner.train()
        else:
            with pytest.raises(expect):
                runner.train()
    finally:
        runner.logger.removeHandler(records)
    return runner, records


def config_file(cfg, tmp_path):
    path = tmp_path / 'cfg.py'
    cfg.dump(str(path))
    return Config.fromfile(str(path))


def assert_checkpoints_intact(work_dir, its=(2, 4)):
    for it in its:
        state = torch.load(work_dir / f'iter_{it}.pth', map_location='cpu')['state_dict']
        assert any('weight_orepa_origin' in k for k in state)


def deploy_files(folder):
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(('deploy', '.deploy')))


def fold_tool():
    """tools/fold.py as a module (its ``main(argv)`` returns the exit status)."""
    return load_tool('fold')


def redo_with_fold_tool(hint, tmp_path):
    """Run the ``tools/fold.py ...`` command that an ERROR line names."""
    import shlex
    command = hint.split('redo it with: ', 1)[1]
    argv = shlex.split(command)[2:]  # drop 'python tools/fold.py'
    assert fold_tool().main(argv) == 0
    return argv[-1]


def test_measuring_failure_is_a_warning_and_the_files_are_written(image_folder, tmp_path,
                                                                  monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError('max(): Expected reduction dim to be specified (injected)')

    import importlib  # the module of the check that FoldHook and tools/fold.py share
    monkeypatch.setattr(importlib.import_module('mmreparam.apis.fold_check'),
                        'fold_error_on_batch', broken)
    cfg = classifier_cfg(image_folder, tmp_path, hooks=[dict(type='mmreparam.FoldHook')])
    runner, records = run_training(cfg)
    warnings = records.lines(logging.WARNING)
    assert len(warnings) == 1 and 'could not measure the fold error (RuntimeError: max()' \
        in warnings[0], warnings
    assert not records.lines(logging.ERROR)
    meta = torch.load(tmp_path / 'deploy.pth', weights_only=True)['meta']
    assert meta['fold_check']['status'] == 'not measured' and meta['fold_error'] is None
    assert (tmp_path / 'deploy_config.py').exists()


def test_a_wrong_fold_is_an_error_recorded_in_the_meta(image_folder, tmp_path, foreign_neck):
    cfg = classifier_cfg(image_folder, tmp_path, hooks=[dict(type='mmreparam.FoldHook')])
    cfg.model.neck = dict(type=foreign_neck, on_deploy='scale')
    runner, records = run_training(cfg)
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'above max_rel_error=0.0001' in errors[0], errors
    meta = torch.load(tmp_path / 'deploy.pth', weights_only=True)['meta']
    assert meta['fold_check']['status'] == 'failed' and meta['fold_error']['max_rel'] > 0.1
    assert (tmp_path / 'deploy_config.py').exists()
    assert_checkpoints_intact(tmp_path)


def test_fold_failure_loses_nothing_and_fold_py_redoes_the_export(image_folder, tmp_path,
                                                                  foreign_neck, monkeypatch):
    cfg = classifier_cfg(image_folder, tmp_path / 'work',
                         hooks=[dict(type='mmreparam.FoldHook')])
    cfg.model.neck = dict(type=foreign_neck, on_deploy='raise')
    runner, records = run_training(config_file(cfg, tmp_path))
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1, errors
    # the foreign error, with the module's path (FoldHook folds with strict=True)
    assert 'export failed while folding the model (ForeignFoldError: 1 module(s) of ' \
        'ImageClassifier cannot be folded: ' in errors[0]
    assert '_ForeignNeck.switch_to_deploy() raised RuntimeError: switch_to_deploy is broken ' \
        '(injected), at 1 module(s): neck' in errors[0]
    assert f'python tools/fold.py {tmp_path / "cfg.py"} {tmp_path / "work" / "iter_4.pth"} ' \
        f'{tmp_path / "work"}' in errors[0]
    assert deploy_files(tmp_path / 'work') == []
    assert_checkpoints_intact(tmp_path / 'work')
    # Once the module is mended, the command in the message redoes the export.
    monkeypatch.setattr(_ForeignNeck, 'switch_to_deploy', lambda self: None)
    out = redo_with_fold_tool(errors[0], tmp_path)
    assert deploy_files(tmp_path / 'work') == ['deploy.pth', 'deploy_config.py']
    assert out == str(tmp_path / 'work')


def fail_when_writing(name, error, monkeypatch):
    """Make writes of the temporary of ``name`` fail after writing a part of it."""
    real_save, real_dump = torch.save, Config.dump

    def partial_then_fail(path):
        with open(path, 'wb') as f:
            f.write(b'partial')
        raise error

    def save(obj, path, *args, **kwargs):
        if f'.{name}.tmp.' in str(path):
            partial_then_fail(path)
        return real_save(obj, path, *args, **kwargs)

    def dump(self, path=None):
        if path is not None and f'.{name}.tmp.' in str(path):
            partial_then_fail(path)
        return real_dump(self, path)

    monkeypatch.setattr(torch, 'save', save)
    monkeypatch.setattr(Config, 'dump', dump)


@pytest.mark.parametrize('name', ['deploy.pth', 'deploy_config.py'])
def test_disk_full_while_writing_leaves_no_partial_file(image_folder, tmp_path, monkeypatch,
                                                       name):
    fail_when_writing(name, OSError(28, 'No space left on device'), monkeypatch)
    cfg = classifier_cfg(image_folder, tmp_path, hooks=[dict(type='mmreparam.FoldHook')])
    runner, records = run_training(cfg)
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'export failed while writing deploy.pth to' in errors[0] \
        and 'No space left on device' in errors[0] and 'tools/fold.py' in errors[0], errors
    assert deploy_files(tmp_path) == []  # neither file, no temporary
    assert_checkpoints_intact(tmp_path)
    assert runner.iter == 4


def test_unwritable_output_folder(image_folder, tmp_path):
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the output folder should be')
    hook = dict(type='mmreparam.FoldHook', out_dir=str(blocker / 'deploy'))
    runner, records = run_training(classifier_cfg(image_folder, tmp_path, hooks=[hook]))
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'export failed while writing' in errors[0], errors
    assert deploy_files(tmp_path) == [] and blocker.read_text().startswith('a file')
    assert_checkpoints_intact(tmp_path)


def test_keyboard_interrupt_during_the_write_stops_the_run_after_cleaning_up(
        image_folder, tmp_path, monkeypatch):
    fail_when_writing('deploy.pth', KeyboardInterrupt(), monkeypatch)
    cfg = classifier_cfg(image_folder, tmp_path, hooks=[dict(type='mmreparam.FoldHook')])
    runner, records = run_training(cfg, expect=KeyboardInterrupt)
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'export interrupted while writing deploy.pth' in errors[0]
    assert deploy_files(tmp_path) == []
    assert_checkpoints_intact(tmp_path)


def test_a_failing_every_checkpoint_export_does_not_stop_the_checkpoint(
        image_folder, tmp_path, monkeypatch):
    fail_when_writing('deploy_iter_2.pth', OSError(28, 'No space left on device'),
                      monkeypatch)
    hook = dict(type='mmreparam.FoldHook', every_checkpoint=True, check_batch=False)
    runner, records = run_training(classifier_cfg(image_folder, tmp_path, hooks=[hook]))
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'writing deploy_iter_2.pth' in errors[0], errors
    assert f'{tmp_path / "iter_2.pth"}' in errors[0]
    assert_checkpoints_intact(tmp_path)  # iter_2.pth saved despite the failed export
    assert deploy_files(tmp_path) == ['deploy.pth', 'deploy_config.py', 'deploy_iter_4.pth']


def fold_for_test_runner(image_folder, tmp_path, neck, on_deploy):
    """A Runner with FoldHook(fold_for_test=True) and a foreign neck; its log records."""
    cfg = classifier_cfg(image_folder, tmp_path, max_iters=2, hooks=[
        dict(type='mmreparam.FoldHook', fold_for_test=True)])
    cfg.model.neck = dict(type=neck, on_deploy=on_deploy)
    runner = Runner.from_cfg(cfg)
    records = _Records()
    runner.logger.addHandler(records)
    return runner, records


def test_fold_for_test_with_a_wrong_fold_tests_the_folded_model(image_folder, tmp_path,
                                                                 foreign_neck):
    runner, records = fold_for_test_runner(image_folder, tmp_path, foreign_neck, 'scale')
    hook = [h for h in runner.hooks if isinstance(h, mmreparam.FoldHook)][0]
    tested = []
    runner.test_loop.run_iter = lambda idx, batch, run=runner.test_loop.run_iter: (
        tested.append(runner.model), run(idx, batch))[1]
    runner.test()
    assert tested and all(m.neck.scale == 1.5 for m in tested)  # the folded model ran
    assert hook.last_fold_check['status'] == 'failed'
    errors = records.lines(logging.ERROR)
    assert len(errors) == 2 and 'above max_rel_error' in errors[0] \
        and 'testing the folded model all the same' in errors[1], errors
    assert runner.model.neck.scale == 1.0  # restored


def test_fold_for_test_when_the_fold_fails_tests_the_train_time_model(image_folder, tmp_path,
                                                                     foreign_neck):
    runner, records = fold_for_test_runner(image_folder, tmp_path, foreign_neck, 'raise')
    model = runner.model
    metrics = runner.test()
    assert 'accuracy/top1' in metrics and runner.model is model
    errors = records.lines(logging.ERROR)
    assert len(errors) == 1 and 'testing the train-time model instead' in errors[0]


def test_max_rel_error_must_be_positive():
    with pytest.raises(ValueError, match='max_rel_error must be positive'):
        mmreparam.FoldHook(max_rel_error=0)


def test_deploy_config_drops_a_pretrained_init_from_a_list():
    cfg = Config(dict(default_scope='mmdet', model=dict(
        type='FasterRCNN', backbone=dict(type='mmreparam.ResNet', depth=18, init_cfg=[
            dict(type='Kaiming', layer='Conv2d'),
            dict(type='Pretrained', checkpoint='in1k.pth')]))))
    out = deploy_config(cfg)
    assert out.model.backbone.init_cfg == [dict(type='Kaiming', layer='Conv2d')]
    cfg.model.backbone.init_cfg = [dict(type='Pretrained', checkpoint='in1k.pth')]
    assert 'init_cfg' not in deploy_config(cfg).model.backbone


@pytest.mark.parametrize('on_deploy', ['scale', 'raise'])
def test_fold_tool_on_a_wrong_or_failing_fold(image_folder, tmp_path, foreign_neck, on_deploy,
                                              capsys):
    """tools/fold.py: a fold error above --max-rel-error writes the files (marked) and
    exits 1; a fold that raises writes nothing and exits 1; one error line each."""
    cfg = classifier_cfg(image_folder, tmp_path / 'work', max_iters=2)
    cfg.model.neck = dict(type=foreign_neck, on_deploy=on_deploy)
    runner, _ = run_training(config_file(cfg, tmp_path))
    out = tmp_path / 'out'
    status = fold_tool().main([str(tmp_path / 'cfg.py'), str(tmp_path / 'work' / 'iter_2.pth'),
                               str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith('tools/fold.py: error: '), err
    if on_deploy == 'scale':
        assert 'above --max-rel-error 0.0001' in err[0]
        meta = torch.load(out / 'deploy.pth', weights_only=True)['meta']
        assert meta['fold_check']['status'] == 'failed'
        assert (out / 'deploy_config.py').exists()
    else:
        assert 'folding the model failed (ForeignFoldError: ' in err[0]  # fold(strict=True)
        assert 'switch_to_deploy() raised RuntimeError: switch_to_deploy is broken (injected), ' \
            'at 1 module(s): neck' in err[0]
        assert deploy_files(out) == []


def test_test_py_warns_on_a_deploy_pair_marked_failed(image_folder, tmp_path, foreign_neck,
                                                      capfd, monkeypatch):
    """tools/test.py on a deploy pair whose fold check failed says so, once, in the log."""
    import sys

    from mmreparam.cli.toolbox import run_upstream_tool
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    cfg = classifier_cfg(image_folder, tmp_path, max_iters=2,
                         hooks=[dict(type='mmreparam.FoldHook')])
    cfg.model.neck = dict(type=foreign_neck, on_deploy='scale')
    run_training(cfg)
    capfd.readouterr()
    deploy = tmp_path / 'deploy.pth'
    run_upstream_tool('test.py', [str(tmp_path / 'deploy_config.py'), str(deploy),
                                  '--work-dir', str(tmp_path / 'test')])
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines()
             if 'marked fold_check=failed' in line]
    assert len(lines) == 1, out.out[-3000:]
    assert 'WARNING' in lines[0] and f'{deploy} is marked fold_check=failed' in lines[0]
    assert 'above max_rel_error=0.0001' in lines[0]
    from mmengine.runner import Runner
    assert Runner.load_checkpoint.__name__ == 'load_checkpoint'  # unpatched afterwards


def test_fold_check_warning_only_for_a_failed_check():
    from mmreparam.cli.toolbox import fold_check_warning
    for meta in ({}, dict(fold_check=dict(status='passed')),
                 dict(fold_check=dict(status='not measured'))):
        assert fold_check_warning(dict(meta=meta, state_dict={}), 'x.pth') is None
    assert fold_check_warning(None, 'x.pth') is None
    failed = dict(fold_check=dict(status='failed', max_rel_error=1e-4, measured_on='a batch'),
                  fold_error=dict(max_rel=0.5))
    assert fold_check_warning(dict(meta=failed), 'x.pth').startswith(
        'x.pth is marked fold_check=failed: when it was written, its fold error 0.5 on a '
        'batch was above max_rel_error=0.0001')


def test_error_lines_say_where_in_fold_hook_and_propose_a_writable_folder(image_folder,
                                                                          tmp_path):
    """mmengine writes an ERROR's origin: FoldHook's method, not mmengine's print_log; the
    redo command names the work dir, not the folder that could not be written."""
    from mmengine.logging.logger import MMFormatter
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the output folder should be')
    hook = dict(type='mmreparam.FoldHook', out_dir=str(blocker / 'deploy'))
    runner, records = run_training(classifier_cfg(image_folder, tmp_path, hooks=[hook]))
    error, = [r for r in records.records if r.levelno == logging.ERROR]
    assert error.pathname == fold_hook_module.__file__ and error.funcName == '_export'
    line = MMFormatter(color=False).format(error)
    assert 'logger.py' not in line and ' - print_log - ' not in line
    assert f'fold_hook.py - _export - {error.lineno} - FoldHook: export failed' in line
    hint = error.getMessage().split('redo it with: ', 1)[1]
    assert hint == f'python tools/fold.py CONFIG {tmp_path / "iter_4.pth"} {tmp_path}'


def test_a_full_work_dir_is_not_proposed_again(image_folder, tmp_path, monkeypatch):
    fail_when_writing('deploy.pth', OSError(28, 'No space left on device'), monkeypatch)
    cfg = classifier_cfg(image_folder, tmp_path, hooks=[dict(type='mmreparam.FoldHook')])
    runner, records = run_training(cfg)
    error, = records.lines(logging.ERROR)
    assert error.endswith(f'redo it with: python tools/fold.py CONFIG {tmp_path / "iter_4.pth"}'
                          f' OUT_DIR (a folder that can be written, not {tmp_path})')


def test_fold_tool_fuse_bn_writes_a_pair_that_loads_and_tests(image_folder, tmp_path, capfd,
                                                              monkeypatch):
    """tools/fold.py --fuse-bn: all 20 conv -> BN pairs of the folded ResNet-18 are fused, the
    fold check measures the fused model, and the deploy pair (mmreparam.FusedBN config)
    loads strictly and runs with the upstream tools/test.py."""
    import sys

    from mmreparam.cli.model import build_model, load_weights
    from mmreparam.cli.toolbox import run_upstream_tool
    cfg = classifier_cfg(image_folder, tmp_path / 'work', max_iters=2)
    run_training(config_file(cfg, tmp_path))
    out = tmp_path / 'out'
    status = fold_tool().main([str(tmp_path / 'cfg.py'), str(tmp_path / 'work' / 'iter_2.pth'),
                               str(out), '--fuse-bn'])
    printed = capfd.readouterr().out
    assert status == 0, printed
    assert 'fused 20 BN pair(s)' in printed and 'unfused' not in printed, printed
    ckpt = torch.load(out / 'deploy.pth', weights_only=True)
    state, meta = ckpt['state_dict'], ckpt['meta']
    assert meta['fold_check']['status'] == 'passed'
    assert meta['fold_error']['max_rel'] < 1e-5
    assert meta['deploy_form'] == 'mmreparam' and '--fuse-bn' in meta['deploy_form_why']
    assert not any('bn' in k or 'downsample.1' in k for k in state), list(state)[:10]
    deploy_cfg = Config.fromfile(str(out / 'deploy_config.py'))
    assert deploy_cfg.model.type == 'mmreparam.FusedBN'
    model = build_model(deploy_cfg)
    load_weights(model, str(out / 'deploy.pth'))  # strict: every key matches
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in model.modules())
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    capfd.readouterr()
    run_upstream_tool('test.py', [str(out / 'deploy_config.py'), str(out / 'deploy.pth'),
                                  '--work-dir', str(tmp_path / 'test')])
    assert 'accuracy/top1' in capfd.readouterr().out


def test_fold_tool_fuse_bn_without_a_test_batch(image_folder, tmp_path, capsys):
    """--fuse-bn needs the test batch to find the pairs: one error line, nothing written."""
    cfg = classifier_cfg(image_folder, tmp_path / 'work', max_iters=2)
    run_training(config_file(cfg, tmp_path))
    out = tmp_path / 'out'
    status = fold_tool().main([str(tmp_path / 'cfg.py'), str(tmp_path / 'work' / 'iter_2.pth'),
                               str(out), '--fuse-bn', '--cfg-options',
                               f'test_dataloader.dataset.data_root={tmp_path / "missing"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and '--fuse-bn runs the model on the first test ' \
        'batch' in err[0] and 'nothing was written' in err[0], err
    assert deploy_files(out) == []
