"""The hooks tools/test.py adds to an upstream run: through --cfg-options, no patching."""
import json
import os.path as osp
from types import SimpleNamespace

import pytest
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
        type='mmreparam.MetricsJsonHook', path=osp.abspath(tmp_path / 'm.json'))
    assert cfg.default_hooks.mmreparam_fold_check.type == 'mmreparam.FoldCheckWarningHook'
    assert _hook_options('train.py', None) == []


def test_a_metrics_path_the_option_parser_would_change_is_refused(tmp_path):
    with pytest.raises(ValueError, match='without spaces, commas'):
        _hook_options('test.py', str(tmp_path / 'my results' / 'm.json'))
