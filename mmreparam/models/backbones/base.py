"""What mmreparam's backbones share: stage freezing, norm_eval, pretrained init, deploy."""
from typing import List

import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers.base import fold_children


class ReparamBackbone(BaseModule):
    """Base of :class:`ResNet` and :class:`RepVGG`.

    Subclasses set ``self.stem``, ``self.frozen_stages``, ``self.norm_eval`` and
    ``self.deploy``, and list their stages (after the stem) in :meth:`stage_modules`.
    """

    def stage_modules(self) -> List[nn.Module]:
        """The stages after the stem, in order."""
        raise NotImplementedError

    def _freeze_stages(self):
        """Freeze the stem (``frozen_stages >= 0``) and the first ``frozen_stages`` stages."""
        if self.frozen_stages < 0:
            return
        for module in [self.stem, *self.stage_modules()[:self.frozen_stages]]:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        """Set the mode, keeping frozen stages and (with ``norm_eval``) BNs in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def init_weights(self):
        """Load ``init_cfg=dict(type='Pretrained', ...)`` through mmreparam's converter
        (any supported checkpoint layout), or initialize as mmengine does."""
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from ...checkpoint import load_pretrained  # the checkpoint layer builds on models
            load_pretrained(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
            self._is_init = True
            return
        super().init_weights()

    def switch_to_deploy(self):
        """Fold every block in place (the mmpretrain-style name of :func:`mmreparam.fold`)."""
        fold_children(self)
        self.deploy = True
