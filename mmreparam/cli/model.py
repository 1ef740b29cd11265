"""A tool's inputs: its paths checked, the config's model built in its toolbox's scope, a
checkpoint loaded into it."""
import os
from typing import Optional

import torch
import torch.nn as nn
from mmengine.config import Config

from ..checkpoint import CheckpointError, safe_load
from ..checkpoint.reading import check_finite


def check_paths(config: str, checkpoint: str, out_dir: str) -> None:
    """Raise the one clear OSError for a missing config or checkpoint, or an output
    directory that is a file."""
    for path, what in ((config, 'config'), (checkpoint, 'checkpoint')):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{what} {path!r} does not exist')
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f'output directory {out_dir!r} is a file')


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """The config at ``path`` with ``--cfg-options`` merged in."""
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` with the registry of the config's toolbox (mmdet / mmseg /
    mmpretrain), whose default scope is set on the way."""
    from mmengine.registry import init_default_scope

    from ..apis.deploy import models_registry
    from .toolbox import detect_toolbox
    toolbox = detect_toolbox(cfg)
    init_default_scope(toolbox)
    return models_registry(toolbox).build(cfg.model)


def load_weights(model: nn.Module, path: str) -> None:
    """Load the checkpoint at ``path`` (safe loader) into ``model``; every key must match.

    Raises:
        CheckpointError: No state_dict in the file, NaN or Inf values, keys missing /
            unexpected, or tensors that do not fit.
    """
    ckpt = safe_load(path)
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f'{path!r} holds no state_dict')
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor)
               for key, value in state.items()):
        raise CheckpointError(f'{path!r}: its state_dict holds entries that are not tensors')
    check_finite(state, f'checkpoint {path!r}')
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit: torch lists them all
        raise CheckpointError(f'{path!r} does not fit the model of the config: '
                              f'{" ".join(str(err).split())[:300]}') from err
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise CheckpointError(
            f'{path!r} does not match the model of the config: {len(missing)} missing keys '
            f'(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')


__all__ = ['check_paths', 'load_config', 'build_model', 'load_weights']
