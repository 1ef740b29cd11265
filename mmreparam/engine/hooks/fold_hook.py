"""FoldHook: write the folded model and its deploy config after training."""
import copy
import logging
import os
import os.path as osp
import shlex
from typing import Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook, EMAHook, Hook
from mmengine.logging import MMLogger
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop

from ...apis.deploy import DEPLOY_CKPT, check_deploy_form, export_deploy
from ...apis.fold import fold
from ...apis.fold_check import check_fold, fold_check_messages
from ...registry import HOOKS
from ...utils import describe_error


def _log(message: str, level: int = logging.INFO) -> None:
    """Log ``FoldHook: message`` to the current logger.

    mmengine's formatter writes the place that logged an ERROR (``pathname - funcName -
    lineno``); ``stacklevel`` makes that the FoldHook method that decided, instead of
    mmengine's ``print_log``, through which every message would seem to come.
    """
    MMLogger.get_current_instance().log(level, f'FoldHook: {message}', stacklevel=2)


@HOOKS.register_module()
class FoldHook(Hook):
    """Fold the trained model and write its deploy artifacts into the work dir.

    After training (and optionally after every checkpoint) it writes ``deploy.pth`` (the
    folded weights) and ``deploy_config.py``: the upstream model (mmdet's / mmseg's /
    mmpretrain's classes, see :func:`mmreparam.apis.upstream_deploy`) where every mmreparam
    part has an upstream class, else the training config with ``deploy=True`` on every
    re-parameterizable backbone (see ``deploy_form``). It measures the fold error on one
    real batch of the validation data (train-time vs folded outputs, eval mode) and logs
    it. The weights exported are those the checkpoints hold: the EMA weights when an
    ``EMAHook`` runs.

    The live model is never modified: the fold works on a deep copy, so ``EMAHook``,
    ``--resume`` and further training are unaffected. Only rank 0 writes, atomically.

    The export never turns a finished training into a failure:

    - measuring is advisory: when the fold error cannot be measured (the model's outputs
      are empty, the batch cannot be loaded, ...) one WARNING says why and the files are
      written all the same;
    - a fold error above ``max_rel_error`` is logged as an ERROR and recorded in
      ``deploy.pth``'s meta (``fold_check``), and the files are still written;
    - when the fold or the writing fails (a module whose ``switch_to_deploy`` raises, a
      full disk, an unwritable folder), one ERROR says what failed and how to redo the
      export offline with ``tools/fold.py``; no partial file is left and training goes
      on (or ends) as it would have. A KeyboardInterrupt during the export still stops the
      run, after the same clean-up.

    Args:
        fold_for_test (bool): Run the test loop on a folded copy of the model (restored
            afterwards). The fold error is measured on a test batch first; when it is above
            ``max_rel_error`` the folded model is still the one tested (its metrics are
            what the deployed model gives) and the log has an ERROR saying so. When the
            fold itself fails, the train-time model is tested and the ERROR says that.
            Defaults to False.
        every_checkpoint (bool): Also export after each checkpoint save, as
            ``deploy_iter_N.pth`` / ``deploy_epoch_N.pth``. A failing export never stops
            the checkpoint from being saved. Defaults to False.
        check_batch (bool): Measure the fold error on a validation batch. Defaults to True.
        out_dir (str, optional): Where to write; None gives the work dir.
        max_rel_error (float): The largest relative fold error (largest absolute difference
            over the largest absolute output, see :func:`mmreparam.fold_error`) accepted as
            exact. A correct fold stays near 1e-6 in float32; TF32 is turned off for the
            check. Defaults to 1e-4.
        deploy_form (str): ``'upstream'``: write the deploy pair as the upstream model
            (mmdet's / mmseg's / mmpretrain's own classes, no mmreparam type, so it runs
            and exports with mmdeploy where mmreparam is not installed) whenever every
            mmreparam part has an upstream class computing the same function, else in
            mmreparam's form; ``'mmreparam'``: always mmreparam's form (``deploy=True``
            backbones). The log says which form was written and why (also in
            ``deploy.pth``'s meta, ``deploy_form`` / ``deploy_form_why``). Defaults to
            ``'upstream'``.
    """
    priority = 'VERY_LOW'  # after CheckpointHook and EMAHook

    def __init__(self, fold_for_test: bool = False, every_checkpoint: bool = False,
                 check_batch: bool = True, out_dir: Optional[str] = None,
                 max_rel_error: float = 1e-4, deploy_form: str = 'upstream'):
        if not max_rel_error > 0:
            raise ValueError(f'FoldHook: max_rel_error must be positive, got {max_rel_error!r}')
        self.deploy_form = check_deploy_form(deploy_form)
        self.fold_for_test = fold_for_test
        self.every_checkpoint = every_checkpoint
        self.check_batch = check_batch
        self.out_dir = out_dir
        self.max_rel_error = float(max_rel_error)
        self.last_fold_error: Optional[dict] = None
        self.last_fold_check: Optional[dict] = None
        self._test_model = None

    @staticmethod
    def _unwrap(model):
        return model.module if is_model_wrapper(model) else model

    def _deploy_source(self, runner) -> torch.nn.Module:
        """A copy of the model holding the weights the checkpoints hold (EMA if any)."""
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and getattr(hook, 'ema_model', None) is not None:
                return copy.deepcopy(hook.ema_model.module)
        return copy.deepcopy(self._unwrap(runner.model))

    @staticmethod
    def _first_batch(runner, loader_names):
        """``('a validation batch', batch)``: the first batch of the first dataloader
        configured among ``loader_names``."""
        for name in loader_names:
            try:
                loader = getattr(runner, name)
            except Exception:  # not configured
                loader = None
            if loader is not None:
                split = dict(val='validation', train='training').get(name.split('_')[0],
                                                                    name.split('_')[0])
                return f'a {split} batch', next(iter(loader))
        raise ValueError('no dataloader is configured')

    def _check(self, runner, model, folded, loader_names) -> dict:
        """Measure the fold error (:func:`mmreparam.apis.fold_check.check_fold`) and log it;
        never raises. Returns the ``fold_check`` record."""
        record, self.last_fold_error = check_fold(
            model, folded, lambda: self._first_batch(runner, loader_names), self.max_rel_error)
        for level, message in fold_check_messages(record, self.last_fold_error):
            _log(message, level)
        return record

    @staticmethod
    def _redo_hint(runner, checkpoint: Optional[str], out_dir: str,
                   out_dir_failed: bool = False) -> str:
        """The ``tools/fold.py`` command that redoes the export. When writing into
        ``out_dir`` failed, it names another folder: the work dir if that is another one and
        can be written, else ``OUT_DIR`` to be chosen."""
        config = getattr(runner.cfg, 'filename', None) or 'CONFIG'
        if checkpoint is None:
            checkpoint = 'CHECKPOINT'
            for hook in runner.hooks:
                if isinstance(hook, CheckpointHook):
                    last = osp.join(getattr(hook, 'out_dir', None) or runner.work_dir,
                                    'last_checkpoint')
                    if osp.isfile(last):
                        with open(last) as f:
                            checkpoint = f.read().strip() or checkpoint
        note = ''
        if out_dir_failed:
            work_dir = runner.work_dir
            if osp.abspath(work_dir) != osp.abspath(out_dir) and os.access(work_dir, os.W_OK):
                out_dir = work_dir
            else:
                out_dir, note = 'OUT_DIR', f' (a folder that can be written, not {out_dir})'
        command = ' '.join(shlex.quote(str(a)) for a in (config, checkpoint))
        command += ' ' + (out_dir if out_dir == 'OUT_DIR' else shlex.quote(str(out_dir)))
        return f'redo it with: python tools/fold.py {command}{note}'

    def _export(self, runner, source, ckpt_name=DEPLOY_CKPT,
                checkpoint: Optional[str] = None) -> Optional[dict]:
        """Fold ``source()``, check, write. Never raises an ``Exception``; returns the
        written paths, or None when nothing was written."""
        out_dir = self.out_dir or runner.work_dir
        stage = 'copying the model'
        try:
            model = source()
            model.eval()
            stage = 'folding the model'
            folded = fold(model, strict=True)
            if self.check_batch:
                fold_check = self._check(runner, model, folded, ('val_dataloader',
                                                                 'test_dataloader',
                                                                 'train_dataloader'))
            else:
                self.last_fold_error = None
                fold_check = dict(status='not measured', max_rel_error=self.max_rel_error,
                                  reason='check_batch=False')
            self.last_fold_check = fold_check
            meta = dict(iter=runner.iter, epoch=runner.epoch, fold_error=self.last_fold_error,
                        fold_check=fold_check, experiment_name=runner.experiment_name)
            stage = f'writing {ckpt_name} to {out_dir}'
            return export_deploy(folded, runner.cfg, out_dir, meta, ckpt_name=ckpt_name,
                                 deploy_form=self.deploy_form)
        except Exception as exc:
            hint = self._redo_hint(runner, checkpoint, out_dir,
                                   out_dir_failed=stage.startswith('writing'))
            _log(f'export failed while {stage} ({describe_error(exc)}); no deploy file was '
                 f'written or changed and the training checkpoints are untouched; {hint}',
                 logging.ERROR)
        except KeyboardInterrupt:
            _log(f'export interrupted while {stage}; no deploy file was written or changed; '
                 f'{self._redo_hint(runner, checkpoint, out_dir)}', logging.ERROR)
            raise
        return None

    def after_train(self, runner) -> None:
        """Fold a copy of the trained model and write the deploy artifacts (rank 0)."""
        if is_main_process():
            self._export(runner, lambda: self._deploy_source(runner))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """With ``every_checkpoint``: export the weights of the checkpoint being saved.

        Runs after ``EMAHook`` has put the EMA weights into ``checkpoint['state_dict']``.
        """
        if not self.every_checkpoint or not is_main_process():
            return
        meta = checkpoint.get('meta', {})
        by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        tag = f'epoch_{meta.get("epoch", runner.epoch)}' if by_epoch else \
            f'iter_{meta.get("iter", runner.iter)}'

        def source():
            model = copy.deepcopy(self._unwrap(runner.model))
            model.load_state_dict(checkpoint['state_dict'])
            return model

        self._export(runner, source, ckpt_name=f'deploy_{tag}.pth',
                     checkpoint=osp.join(runner.work_dir, f'{tag}.pth'))

    def before_test(self, runner) -> None:
        """With ``fold_for_test``: test a folded copy of the model."""
        if not self.fold_for_test:
            return
        model = self._unwrap(runner.model)
        try:
            folded = fold(model, strict=True)
        except Exception as exc:
            _log(f'folding for the test failed ({describe_error(exc)}); testing the train-time '
                 'model instead', logging.ERROR)
            return
        if self.check_batch:
            check = self._check(runner, model, folded, ('test_dataloader', 'val_dataloader'))
            self.last_fold_check = check
            if check['status'] == 'failed':
                _log('testing the folded model all the same: its metrics are those the '
                     'deployed model would give', logging.ERROR)
        self._test_model = runner.model
        runner.model = folded
        _log('testing the folded model')

    def after_test(self, runner) -> None:
        """Restore the model that was replaced for the test."""
        if self._test_model is not None:
            runner.model = self._test_model
            self._test_model = None
