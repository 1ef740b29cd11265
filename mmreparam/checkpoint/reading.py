"""Reading a checkpoint's tensors: unwrap, strip ``module.`` and a key prefix."""
import os
from typing import Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from ..errors import CheckpointError
from .safe_load import safe_load

StateDict = Dict[str, Tensor]


def _read(checkpoint: Union[str, os.PathLike]) -> object:
    path = os.fspath(checkpoint)
    if '://' in path and not os.path.exists(path):
        # torchvision://, open-mmlab://, http(s):// ...: mmengine resolves and caches them
        # (its torch.load keeps torch's weights_only default).
        from mmengine.runner.checkpoint import CheckpointLoader
        try:
            return CheckpointLoader.load_checkpoint(path, map_location='cpu')
        except Exception as err:
            raise CheckpointError(f'cannot load checkpoint {path!r}: {err}') from err
    return safe_load(path)


def read_state_dict(checkpoint: Union[str, os.PathLike, Mapping],
                    prefix: Optional[str] = None) -> Tuple[StateDict, Optional[str]]:
    """Read the tensors of a checkpoint: unwrap, strip ``module.`` and the prefix.

    Args:
        checkpoint (str | PathLike | Mapping): A file, a URL mmengine can resolve, or an
            already loaded checkpoint / state_dict.
        prefix (str, optional): Keep only the keys under this prefix (e.g. ``'backbone.'``)
            and strip it. None strips ``backbone.`` when the checkpoint is a whole model.

    Returns:
        tuple[dict, str | None]: The state_dict and the prefix that was applied.

    Raises:
        CheckpointError: Unreadable file, no tensors, or no key under ``prefix``.
    """
    obj = checkpoint if isinstance(checkpoint, Mapping) else _read(checkpoint)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint holds a {type(obj).__name__}, not a state_dict')
    for wrapper in ('state_dict', 'model'):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    state = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            while key.startswith('module.'):  # (Distributed)DataParallel
                key = key[len('module.'):]
            state[key] = value
    if not state:
        raise CheckpointError('checkpoint holds no tensors (expected a state_dict, or a dict '
                              "with 'state_dict' or 'model')")
    if prefix is None and any(key.startswith('backbone.') for key in state):
        prefix = 'backbone.'
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        selected = {key[len(prefix):]: value for key, value in state.items()
                    if key.startswith(prefix)}
        if not selected:
            raise CheckpointError(f'no checkpoint key starts with prefix {prefix!r}; keys '
                                  f'look like {sorted(state)[:3]}')
        state = selected
    return state, prefix or None


__all__ = ['StateDict', 'read_state_dict']
