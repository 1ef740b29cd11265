"""Deploy artifacts: the deploy config and the folded checkpoint, written atomically.

Shared by :class:`mmreparam.engine.FoldHook` (after training) and ``tools/fold.py``
(offline), so both write exactly the same files.
"""
import copy
import inspect
import logging
import os
from typing import Any, Optional

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import MODELS as ROOT_MODELS

from ..fileio import atomic_write, atomic_write_files, save_checkpoint_atomic
from ..utils import pretrained_init, without_pretrained

DEPLOY_CKPT = 'deploy.pth'
DEPLOY_CONFIG = 'deploy_config.py'


def models_registry(scope: Optional[str]):
    """The ``MODELS`` registry of a toolbox scope (``'mmdet'``, ...), else mmengine's root."""
    if scope:
        try:
            return __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
        except (ImportError, AttributeError):
            pass
    return ROOT_MODELS


def _accepts_deploy(type_name: Any, registry) -> bool:
    if not isinstance(type_name, str):
        cls = type_name
    else:
        cls = registry.get(type_name)
    if cls is None:
        return False
    try:
        return 'deploy' in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _set_deploy(node: Any, registry) -> int:
    """Set ``deploy=True`` on every sub-config whose class takes ``deploy``; count them."""
    count = 0
    if isinstance(node, dict):
        if 'type' in node and _accepts_deploy(node['type'], registry):
            node['deploy'] = True
            if pretrained_init(node.get('init_cfg')) is not None:
                # the weights come from the deploy checkpoint; other inits are kept
                init_cfg = without_pretrained(node['init_cfg'])
                if init_cfg is None:
                    node.pop('init_cfg')
                else:
                    node['init_cfg'] = init_cfg
            node.pop('pretrained', None)
            count += 1
        for value in node.values():
            count += _set_deploy(value, registry)
    elif isinstance(node, (list, tuple)):
        count += sum(_set_deploy(v, registry) for v in node)
    return count


def deploy_config(cfg: Config) -> Config:
    """The same config with ``deploy=True`` on every re-parameterizable model part.

    Every ``mmreparam.Reparameterized`` part becomes its inner module's config (its fold is
    the upstream module, with that module's state_dict keys).

    Every sub-config of ``cfg.model`` whose class takes a ``deploy`` argument (mmreparam's
    backbones, and other libraries' such as mmpretrain's RepVGG) gets ``deploy=True``; its
    ``Pretrained`` init is dropped (the weights come from the deploy checkpoint), as is a
    model-level ``pretrained`` (mmseg). ``load_from`` / ``resume`` are cleared and
    :class:`FoldHook` is removed from ``custom_hooks``. Everything else is unchanged.

    Raises:
        ValueError: Nothing in ``cfg.model`` takes ``deploy``.
    """
    from .reparameterize import unwrap_for_deploy
    cfg = copy.deepcopy(cfg)
    # A folded mmreparam.Reparameterized part is its upstream module (same keys).
    cfg.model, count = unwrap_for_deploy(cfg.model)
    count += _set_deploy(cfg.model, models_registry(cfg.get('default_scope')))
    if count == 0:
        raise ValueError('no part of cfg.model takes a deploy argument: nothing to fold')
    deploy_cleanup(cfg)
    return cfg


def deploy_cleanup(cfg: Config) -> None:
    """What every deploy config changes outside the model's parts, in place: no model-level
    ``pretrained`` (mmseg), no ``load_from`` / ``resume``, no :class:`FoldHook`."""
    model = cfg.model
    if isinstance(model, dict) and model.get('pretrained') is not None:
        model['pretrained'] = None
    cfg.load_from = None
    cfg.resume = False
    hooks = cfg.get('custom_hooks') or []
    cfg.custom_hooks = [h for h in hooks
                        if not str(h.get('type', '')).endswith('FoldHook')]


#: The forms of the deploy pair: ``'upstream'`` (the upstream toolbox's classes, where every
#: mmreparam part has one; else mmreparam's form) and ``'mmreparam'`` (always ours).
DEPLOY_FORMS = ('upstream', 'mmreparam')


def check_deploy_form(deploy_form: str) -> str:
    """Return ``deploy_form`` if it is one of :data:`DEPLOY_FORMS`, else raise ValueError."""
    if deploy_form not in DEPLOY_FORMS:
        raise ValueError(f'deploy_form must be one of {DEPLOY_FORMS}, got {deploy_form!r}')
    return deploy_form


def deploy_pair(folded: torch.nn.Module, cfg: Config, deploy_form: str = 'upstream') -> dict:
    """The deploy config and state_dict to write, in the form asked for where possible.

    With ``deploy_form='upstream'`` the pair is the upstream model's
    (:func:`~mmreparam.apis.upstream.upstream_deploy`) when every mmreparam part has an
    upstream class; otherwise, and with ``'mmreparam'``, it is mmreparam's form
    (:func:`deploy_config` and the folded state_dict), which needs mmreparam to run.

    Returns:
        dict: ``config`` (None without a model dict), ``state_dict``, ``form`` (the form
        chosen), ``why`` (one line: what was rewritten, or why mmreparam's form).
    """
    from .upstream import NoUpstreamForm, upstream_deploy
    check_deploy_form(deploy_form)
    state = {k: v.detach().cpu() for k, v in folded.state_dict().items()}
    has_model_cfg = cfg is not None and isinstance(cfg.get('model'), dict)
    if not has_model_cfg:
        return dict(config=None, state_dict=state, form='mmreparam',
                    why='the config has no model dict (a Runner built from a model object)')
    if deploy_form == 'mmreparam':
        return dict(config=deploy_config(cfg), state_dict=state, form='mmreparam',
                    why="deploy_form='mmreparam'")
    try:
        pair = upstream_deploy(cfg, state)
    except NoUpstreamForm as exc:
        why = f'no upstream form: {exc}'
    except Exception as exc:  # the export must not fail for the upstream form's sake
        why = f'the upstream form failed ({type(exc).__name__}: {exc})'
        print_log(f'mmreparam: {why}', logger='current', level=logging.WARNING)
    else:
        return dict(config=pair.config, state_dict=pair.state_dict, form='upstream',
                    why='; '.join(pair.parts) or 'no mmreparam part')
    return dict(config=deploy_config(cfg), state_dict=state, form='mmreparam', why=why)


def export_deploy(folded: torch.nn.Module, cfg: Config, out_dir: str,
                  meta: Optional[dict] = None, ckpt_name: str = DEPLOY_CKPT,
                  config_name: str = DEPLOY_CONFIG, deploy_form: str = 'upstream',
                  pair: Optional[dict] = None) -> dict:
    """Write ``deploy.pth`` (folded weights) and ``deploy_config.py`` into ``out_dir``.

    Both files are written as one (:func:`~mmreparam.fileio.atomic_write_files`): after a
    failure, neither is replaced and no partial file is left. The pair is the upstream
    model's where every mmreparam part has an upstream class, else mmreparam's form (see
    :func:`deploy_pair`); the log line and ``meta['deploy_form']`` /
    ``meta['deploy_form_why']`` say which, and why.

    Args:
        folded (nn.Module): The folded model.
        cfg (Config): The training config.
        out_dir (str): Output directory (created if needed).
        meta (dict, optional): Stored under ``meta`` in the checkpoint.
        deploy_form (str): ``'upstream'`` or ``'mmreparam'`` (see :func:`deploy_pair`).
            Defaults to ``'upstream'``.
        pair (dict, optional): The pair to write, as :func:`deploy_pair` returns it (e.g.
            after ``tools/fold.py --fuse-bn`` fused it); None: ``deploy_pair(folded, cfg,
            deploy_form)``. Defaults to None.

    Returns:
        dict: ``checkpoint`` and ``config``, the written paths (``config`` is None when
        ``cfg`` has no ``model`` dict, e.g. a Runner built from a model object), ``form``
        and ``why``.
    """
    if pair is None:
        pair = deploy_pair(folded, cfg, deploy_form)
    dcfg = pair['config']
    ckpt_path = os.path.join(out_dir, ckpt_name)
    cfg_path = os.path.join(out_dir, config_name) if dcfg is not None else None
    ckpt = dict(state_dict=pair['state_dict'],
                meta=dict(meta or {}, deploy=True, deploy_form=pair['form'],
                          deploy_form_why=pair['why']))
    writers = {ckpt_path: lambda tmp: torch.save(ckpt, tmp)}
    if dcfg is not None:
        writers[cfg_path] = dcfg.dump
    atomic_write_files(writers)
    if dcfg is None:
        print_log(f'mmreparam: wrote {ckpt_path}; no deploy config, since the config has no '
                  'model dict (a Runner built from a model object)', logger='current',
                  level=logging.WARNING)
    elif pair['form'] == 'upstream':
        print_log(f'mmreparam: wrote {ckpt_path} and {cfg_path} as the upstream model, which '
                  f'runs without mmreparam ({pair["why"]})', logger='current')
    else:
        print_log(f'mmreparam: wrote {ckpt_path} and {cfg_path} in mmreparam\'s form, which '
                  f'needs mmreparam to run ({pair["why"]})', logger='current')
    return dict(checkpoint=ckpt_path, config=cfg_path, form=pair['form'], why=pair['why'])


__all__ = ['atomic_write', 'save_checkpoint_atomic', 'deploy_config', 'deploy_cleanup',
           'deploy_pair', 'export_deploy', 'models_registry', 'DEPLOY_FORMS',
           'check_deploy_form']
