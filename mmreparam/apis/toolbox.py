"""Run the upstream mmdet / mmseg / mmpretrain tools for a config (``tools/train.py``,
``tools/test.py``): the toolbox is chosen from the config, the rest is theirs."""
import importlib
import json
import os.path as osp
import runpy
import sys
from typing import List, Optional

from mmengine.config import Config

TOOLBOXES = ('mmdet', 'mmseg', 'mmpretrain')


def detect_toolbox(cfg: Config) -> str:
    """The toolbox a config belongs to: its ``default_scope``.

    Raises:
        ValueError: The config's scope is not one of mmdet, mmseg, mmpretrain.
    """
    scope = cfg.get('default_scope')
    if scope in TOOLBOXES:
        return scope
    raise ValueError(f'cannot tell which toolbox runs this config: default_scope is '
                     f'{scope!r}, expected one of {TOOLBOXES} (set default_scope in the '
                     'config, or inherit an upstream config)')


def upstream_tool(toolbox: str, name: str) -> str:
    """Path of ``tools/<name>`` as shipped in the toolbox's wheel (``<pkg>/.mim/tools``)."""
    package = importlib.import_module(toolbox)
    path = osp.join(osp.dirname(package.__file__), '.mim', 'tools', name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{toolbox} does not ship tools/{name} ({path})')
    return path


def run_upstream_tool(name: str, argv: List[str], metrics_json: Optional[str] = None) -> None:
    """Run the upstream ``tools/<name>`` of the config's toolbox in this process.

    ``argv[0]`` must be the config path; the other arguments are passed through unchanged.
    mmreparam is imported first, so its registry scope and safe checkpoint loading are
    active. With ``metrics_json``, the metrics returned by ``Runner.test()`` are also
    written there as JSON.

    Raises:
        FileNotFoundError: The config does not exist.
        ValueError: The config's toolbox cannot be determined.
    """
    import mmreparam  # noqa: F401  (registry scope, checkpoint allow-list)
    if not argv or not osp.isfile(argv[0]):
        raise FileNotFoundError(f'config file {argv[0] if argv else None!r} does not exist')
    toolbox = detect_toolbox(Config.fromfile(argv[0]))
    script = upstream_tool(toolbox, name)
    if metrics_json:
        _dump_test_metrics(metrics_json)
    sys.argv = [script, *argv]
    # The upstream scripts resolve relative imports from their own folder.
    sys.path.insert(0, osp.dirname(script))
    runpy.run_path(script, run_name='__main__')


def _dump_test_metrics(path: str) -> None:
    from mmengine.runner import Runner

    from .deploy import atomic_write
    original = Runner.test

    def test_and_dump(self):
        metrics = original(self)
        atomic_write(path, lambda tmp: _write_json(tmp, metrics))
        return metrics

    Runner.test = test_and_dump


def _write_json(path: str, metrics: dict) -> None:
    with open(path, 'w') as f:
        json.dump({k: float(v) if hasattr(v, '__float__') else v
                   for k, v in (metrics or {}).items()}, f, indent=2)


__all__ = ['TOOLBOXES', 'detect_toolbox', 'upstream_tool', 'run_upstream_tool']
