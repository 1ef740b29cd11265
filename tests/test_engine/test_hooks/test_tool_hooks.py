"""The hooks tools/test.py adds to an upstream run: through --cfg-options, no patching."""
import json
import os
import os.path as osp
from types import SimpleNamespace

from mmengine.config import Config, DictAction

from mmreparam.cli.toolbox import _hook_options
from mmreparam.engine.hooks import MetricsJsonHook
from mmreparam.registry import HOOKS


def test_metrics_json_hook_writes_the_test_metrics(tmp_path):
    path = tmp_path / 'metrics.json'
    hook = HOOKS.build(dict(type='mmreparam.MetricsJsonHook', path=str(path)))
    assert isinstance(hook, MetricsJsonHook)
    hook.after_test_epoch(SimpleNamespace(), metrics={'coco/bbox_mAP': 0.5, 'name': 'x'})
    assert json.loads(path.read_text()) == {'coco/bbox_mAP': 0.5, 'name': 'x'}


def test_hook_options_reach_the_config_as_default_hooks(tmp_path):
    options = _hook_options('test.py', str(tmp_path / 'm.json'))
    assert options[0] == '--cfg-options'
    parsed = {}
    for item in options[1:]:  # as the upstream test.py parses them
        key, value = item.split('=', 1)
        parsed[key] = DictAction._parse_iterable(value)
    cfg = Config(dict(default_hooks=dict(timer=dict(type='IterTimerHook'))))
    cfg.merge_from_dict(parsed)
    assert cfg.default_hooks.mmreparam_metrics_json == dict(
        type='mmreparam.MetricsJsonHook', path=osp.abspath(tmp_path / 'm.json'),
        percent_encoded=True)
    assert cfg.default_hooks.mmreparam_fold_check.type == 'mmreparam.FoldCheckWarningHook'
    assert _hook_options('train.py', None) == []


def test_a_metrics_path_with_spaces_commas_and_brackets_passes_the_option_parser(tmp_path):
    """mmengine's option parser drops spaces and splits at commas and brackets: the path
    goes through it percent-encoded, and the hook writes to the path as given."""
    path = str(tmp_path / "my results, [run 1] 'a'" / 'm.json')
    options = _hook_options('test.py', path)
    parsed = {}
    for item in options[1:]:
        key, value = item.split('=', 1)
        parsed[key] = DictAction._parse_iterable(value)
    cfg = Config(dict(default_hooks=dict()))
    cfg.merge_from_dict(parsed)
    args = dict(cfg.default_hooks.mmreparam_metrics_json)
    args.pop('type')
    hook = MetricsJsonHook(**args)
    assert hook.path == path
    os.makedirs(osp.dirname(path))
    hook.after_test_epoch(None, dict(mAP=0.5))
    assert json.loads(open(path).read()) == {'mAP': 0.5}
