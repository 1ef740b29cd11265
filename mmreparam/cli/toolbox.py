"""Run the upstream mmdet / mmseg / mmpretrain tools for a config (``tools/train.py``,
``tools/test.py``): the toolbox is chosen from the config, the rest is theirs."""
import argparse
import copy
import datetime
import importlib
import os
import os.path as osp
import runpy
import sys
from typing import List, Optional
from urllib.parse import quote

from mmengine.config import Config

from ..engine.hooks.tool_hooks import fold_check_warning

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


def check_tool_arguments(name: str, argv: List[str]) -> Config:
    """What ``tools/<name>`` checks before it starts: the config exists, loads and names its
    toolbox; for ``test.py`` the checkpoint (``argv[1]``) exists too.

    ``tools/dist_run.sh`` makes the same checks once before torchrun starts the processes
    (:mod:`mmreparam.cli.precheck`), so that bad input is one error line.

    Args:
        name (str): The tool, ``'train.py'`` or ``'test.py'``.
        argv (list[str]): Its arguments (config first).

    Returns:
        Config: The config.

    Raises:
        FileNotFoundError: The config or the checkpoint does not exist.
        ValueError: The config's toolbox cannot be determined.
    """
    if not argv or not osp.isfile(argv[0]):
        raise FileNotFoundError(f'config file {argv[0] if argv else None!r} does not exist')
    cfg = Config.fromfile(argv[0])
    detect_toolbox(cfg)
    if name == 'test.py':
        checkpoint = argv[1] if len(argv) > 1 else None
        if checkpoint is None or not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    return cfg


def run_upstream_tool(name: str, argv: List[str], metrics_json: Optional[str] = None) -> None:
    """Run the upstream ``tools/<name>`` of the config's toolbox in this process.

    ``argv[0]`` must be the config path; the other arguments are passed through unchanged.
    mmreparam is imported first, so its registry scope and safe checkpoint loading are
    active. mmreparam's hooks join the run through its ``--cfg-options`` (see
    :func:`_hook_options`): for ``test.py``, a WARNING when the checkpoint is a deploy
    checkpoint marked ``fold_check=failed``; with ``metrics_json``, the metrics returned by
    ``Runner.test()`` are also written there as JSON.

    Raises:
        FileNotFoundError: The config (or test.py's checkpoint) does not exist.
        ValueError: The config's toolbox cannot be determined.
    """
    import torch.distributed as dist

    import mmreparam  # noqa: F401  (registry scope, checkpoint allow-list)
    cfg = check_tool_arguments(name, argv)
    toolbox = detect_toolbox(cfg)
    script = upstream_tool(toolbox, name)
    hook_options = _hook_options(name, metrics_json)
    had_group = dist.is_available() and dist.is_initialized()
    argv = setup_cpu_distributed(cfg, argv)
    started_group = not had_group and dist.is_available() and dist.is_initialized()
    sys.argv = [script, *argv, *hook_options]
    # The upstream scripts resolve relative imports from their own folder.
    sys.path.insert(0, osp.dirname(script))
    runpy.run_path(script, run_name='__main__')
    if started_group and dist.is_initialized():
        _close_process_group()


def _hook_options(name: str, metrics_json: Optional[str]) -> List[str]:
    """``--cfg-options`` that add mmreparam's hooks to this run's Runner (entries of its
    ``default_hooks``, which mmengine registers like the others): for ``test.py`` the
    :class:`~mmreparam.engine.hooks.tool_hooks.FoldCheckWarningHook`, with ``metrics_json``
    the :class:`~mmreparam.engine.hooks.tool_hooks.MetricsJsonHook`.

    The path is percent-encoded: mmengine's option parser drops spaces and splits at commas
    and brackets.
    """
    options = []
    if name == 'test.py':
        options.append('default_hooks.mmreparam_fold_check.type=mmreparam.FoldCheckWarningHook')
    if metrics_json:
        path = quote(osp.abspath(metrics_json), safe='/')
        options += ['default_hooks.mmreparam_metrics_json.type=mmreparam.MetricsJsonHook',
                    f'default_hooks.mmreparam_metrics_json.path={path}',
                    'default_hooks.mmreparam_metrics_json.percent_encoded=True']
    return ['--cfg-options', *options] if options else []


def _close_process_group() -> None:
    """End the process group that :func:`setup_cpu_distributed` started (gloo, no GPU).

    Every rank waits for the others first (rank 0 may still be writing the deploy files),
    then the group is destroyed: leaving it to the interpreter's exit let a gloo rank abort
    ('terminate called without an active exception') while its peer was still working.
    """
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


__all__ = ['TOOLBOXES', 'detect_toolbox', 'upstream_tool', 'check_tool_arguments',
           'run_upstream_tool', 'fold_check_warning']  # fold_check_warning: the old path


def _launch_args(argv: List[str]) -> argparse.Namespace:
    """``--launcher`` and ``--cfg-options`` of a tool's arguments, parsed as the upstream
    tools parse them (the rest is left to them)."""
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--launcher')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={})
    return parser.parse_known_args(argv[1:])[0]


def setup_cpu_distributed(cfg: Config, argv: List[str]) -> List[str]:
    """Make ``--launcher pytorch`` work without GPUs (torchrun with gloo processes).

    mmengine 0.10.7's ``pytorch`` launcher calls ``torch.cuda.set_device`` and wraps the
    model in DDP with ``device_ids=[LOCAL_RANK]``; both fail without CUDA. When no GPU is
    visible this initializes the gloo process group from torchrun's environment (mmengine
    then skips its own initialization) and adds ``model_wrapper_cfg.device_ids=None`` to the
    arguments (CPU DDP). The decision uses the config with the arguments' own
    ``--cfg-options`` merged, and what they set is kept. With GPUs, or without the pytorch
    launcher, nothing changes.

    Args:
        cfg (Config): The config being run.
        argv (list[str]): The tool's arguments (config first).

    Returns:
        list[str]: The arguments to pass on.

    Raises:
        ValueError: torchrun's environment is missing, ``sync_bn='torch'`` (torch's SyncBN
            cannot run on CPU), or a model wrapper other than MMDistributedDataParallel.
    """
    import torch
    import torch.distributed as dist
    launch = _launch_args(argv)
    if launch.launcher != 'pytorch' or torch.cuda.is_available():
        return argv
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise ValueError(f'--launcher pytorch needs the environment torchrun sets; missing '
                         f'{", ".join(missing)} (start it with tools/dist_train.sh)')
    cfg = copy.deepcopy(cfg)
    cfg.merge_from_dict(launch.cfg_options)  # decide on what will run, CLI overrides included
    if cfg.get('sync_bn') == 'torch':
        raise ValueError("sync_bn='torch' converts BNs to torch.nn.SyncBatchNorm, which refuses "
                         "CPU tensors; without GPUs use norm_cfg=dict(type='mmreparam.SyncBN')")
    wrapper = cfg.get('model_wrapper_cfg') or {}
    if wrapper.get('type', 'MMDistributedDataParallel') != 'MMDistributedDataParallel':
        raise ValueError(f'model_wrapper_cfg type {wrapper["type"]!r} is not supported on CPU '
                         'by the pytorch launcher (only MMDistributedDataParallel)')
    if not dist.is_initialized():
        timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
        kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group('gloo', **kwargs)
    from mmengine.logging import print_log
    print_log(f'no GPU: rank {dist.get_rank()} of {dist.get_world_size()} runs on CPU with '
              'gloo (use norm_cfg=dict(type="mmreparam.SyncBN") for synchronized BN)',
              logger='current')
    options = ['model_wrapper_cfg.type=MMDistributedDataParallel',
               'model_wrapper_cfg.device_ids=None']
    if not wrapper:  # what mmengine passes when it builds the wrapper itself
        options += ['model_wrapper_cfg.broadcast_buffers=False',
                    f'model_wrapper_cfg.find_unused_parameters='
                    f'{bool(cfg.get("find_unused_parameters", False))}']
    return [*argv, '--cfg-options', *options]
