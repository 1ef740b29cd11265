"""Hooks that ``tools/test.py`` adds to the upstream toolbox's run (see
:func:`mmreparam.cli.toolbox.run_upstream_tool`): written as hooks, so that the run's
Runner gets them through its config and no class is patched."""
import json
import logging
from typing import Any, Optional
from urllib.parse import unquote

from mmengine.hooks import Hook
from mmengine.logging import print_log

from ...fileio import atomic_write
from ...registry import HOOKS


def fold_check_warning(checkpoint: Any, path: str) -> Optional[str]:
    """The warning for a deploy checkpoint whose fold check failed when it was written.

    Args:
        checkpoint (Any): What was loaded, usually a dict with ``meta``.
        path (str): The checkpoint's path, named in the warning.

    Returns:
        str | None: The warning when ``meta['fold_check']['status'] == 'failed'`` (see
        :class:`mmreparam.FoldHook`), else None.
    """
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    check = meta.get('fold_check') if isinstance(meta, dict) else None
    if not isinstance(check, dict) or check.get('status') != 'failed':
        return None
    error = meta.get('fold_error') or {}
    measured = f'fold error {error["max_rel"]:.3g}' if isinstance(
        error.get('max_rel'), float) else 'a fold error'
    where = f' on {check["measured_on"]}' if check.get('measured_on') else ''
    return (f'{path} is marked fold_check=failed: when it was written, its {measured}{where} '
            f'was above max_rel_error={check.get("max_rel_error", "?")}, so these metrics may '
            'not be those of the trained model (check it again with tools/fold.py CONFIG '
            'TRAIN_CHECKPOINT OUT_DIR)')


@HOOKS.register_module()
class FoldCheckWarningHook(Hook):
    """Log a WARNING when the loaded checkpoint is a deploy checkpoint marked
    ``fold_check=failed`` (:func:`fold_check_warning`): its metrics may not be those of
    the trained model. Only rank 0's logger shows it."""

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Warn about ``checkpoint`` (loaded from ``runner.cfg.load_from``) if marked."""
        warning = fold_check_warning(checkpoint, runner.cfg.get('load_from'))
        if warning:
            print_log(f'mmreparam: {warning}', logger='current', level=logging.WARNING)


@HOOKS.register_module()
class MetricsJsonHook(Hook):
    """Write the test metrics as JSON (``{name: value}``, numbers as floats), atomically.

    Args:
        path (str): The JSON file; replaced after every test epoch.
        percent_encoded (bool): ``path`` is percent-encoded (``urllib.parse.quote``), as a
            path given in ``--cfg-options`` must be to keep its spaces, commas and brackets
            (mmengine's option parser drops or splits at them). Defaults to False.
    """

    def __init__(self, path: str, percent_encoded: bool = False):
        self.path = unquote(path) if percent_encoded else path

    def after_test_epoch(self, runner, metrics: Optional[dict] = None) -> None:
        """Write ``metrics`` (what ``Runner.test()`` returns) to :attr:`path`."""
        values = {k: float(v) if hasattr(v, '__float__') else v
                  for k, v in (metrics or {}).items()}

        def write(tmp: str) -> None:
            with open(tmp, 'w') as f:
                json.dump(values, f, indent=2)

        atomic_write(self.path, write)


__all__ = ['FoldCheckWarningHook', 'MetricsJsonHook', 'fold_check_warning']
