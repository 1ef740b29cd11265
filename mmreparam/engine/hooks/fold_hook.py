"""FoldHook: write the folded model and its deploy config after training."""
import copy
from typing import Optional

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop

from ...apis.deploy import DEPLOY_CKPT, export_deploy
from ...apis.fold import fold, fold_error
from ...registry import HOOKS


@HOOKS.register_module()
class FoldHook(Hook):
    """Fold the trained model and write its deploy artifacts into the work dir.

    After training (and optionally after every checkpoint) it writes ``deploy.pth`` (the
    folded weights) and ``deploy_config.py`` (the training config with ``deploy=True`` on
    every re-parameterizable backbone), measures the fold error on one real batch of the
    validation data (train-time vs folded outputs, eval mode) and logs it. The weights
    exported are those the checkpoints hold: the EMA weights when an ``EMAHook`` runs.

    The live model is never modified: the fold works on a deep copy, so ``EMAHook``,
    ``--resume`` and further training are unaffected. Only rank 0 writes, atomically.

    Args:
        fold_for_test (bool): Run the test loop on a folded copy of the model (restored
            afterwards). Defaults to False.
        every_checkpoint (bool): Also export after each checkpoint save, as
            ``deploy_iter_N.pth`` / ``deploy_epoch_N.pth``. Defaults to False.
        check_batch (bool): Measure the fold error on a validation batch. Defaults to True.
        out_dir (str, optional): Where to write; None gives the work dir.
    """
    priority = 'VERY_LOW'  # after CheckpointHook and EMAHook

    def __init__(self, fold_for_test: bool = False, every_checkpoint: bool = False,
                 check_batch: bool = True, out_dir: Optional[str] = None):
        self.fold_for_test = fold_for_test
        self.every_checkpoint = every_checkpoint
        self.check_batch = check_batch
        self.out_dir = out_dir
        self.last_fold_error: Optional[dict] = None
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

    def _measure(self, runner, model, folded) -> Optional[dict]:
        loader = None
        for name in ('val_dataloader', 'test_dataloader', 'train_dataloader'):
            try:
                loader = getattr(runner, name)
            except Exception:  # not configured
                loader = None
            if loader is not None:
                break
        if loader is None:
            print_log('FoldHook: no dataloader to measure the fold error on',
                      logger='current', level=30)
            return None
        batch = model.data_preprocessor(copy.deepcopy(next(iter(loader))), False)
        return fold_error(model, folded, dict(inputs=batch['inputs'],
                                              data_samples=batch.get('data_samples'),
                                              mode='tensor'))

    def _export(self, runner, model, ckpt_name=DEPLOY_CKPT):
        if not is_main_process():
            return
        model.eval()
        folded = fold(model)
        if self.check_batch:
            self.last_fold_error = self._measure(runner, model, folded)
            if self.last_fold_error is not None:
                print_log('FoldHook: fold error on a validation batch: max abs '
                          f'{self.last_fold_error["max_abs"]:.3g}, max rel '
                          f'{self.last_fold_error["max_rel"]:.3g}', logger='current')
        meta = dict(iter=runner.iter, epoch=runner.epoch, fold_error=self.last_fold_error,
                    experiment_name=runner.experiment_name)
        export_deploy(folded, runner.cfg, self.out_dir or runner.work_dir, meta,
                      ckpt_name=ckpt_name)

    def after_train(self, runner) -> None:
        """Fold a copy of the trained model and write the deploy artifacts."""
        self._export(runner, self._deploy_source(runner))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """With ``every_checkpoint``: export the weights of the checkpoint being saved.

        Runs after ``EMAHook`` has put the EMA weights into ``checkpoint['state_dict']``.
        """
        if not self.every_checkpoint or not is_main_process():
            return
        model = copy.deepcopy(self._unwrap(runner.model))
        model.load_state_dict(checkpoint['state_dict'])
        meta = checkpoint.get('meta', {})
        by_epoch = isinstance(runner.train_loop, EpochBasedTrainLoop)
        tag = f'epoch_{meta.get("epoch", runner.epoch)}' if by_epoch else \
            f'iter_{meta.get("iter", runner.iter)}'
        self._export(runner, model, ckpt_name=f'deploy_{tag}.pth')

    def before_test(self, runner) -> None:
        """With ``fold_for_test``: test a folded copy of the model."""
        if self.fold_for_test:
            self._test_model = runner.model
            runner.model = fold(self._unwrap(runner.model))
            print_log('FoldHook: testing the folded model', logger='current')

    def after_test(self, runner) -> None:
        """Restore the model that was replaced for the test."""
        if self._test_model is not None:
            runner.model = self._test_model
            self._test_model = None
