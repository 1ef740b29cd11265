"""Registered backbones: ``mmreparam.ResNet``, ``mmreparam.RepVGG``, ``mmreparam.RepMLPResNet``,
``mmreparam.RepOptVGG``."""
from .repmlp_resnet import RepMLPResNet
from .repoptvgg import RepOptVGG
from .repvgg import RepVGG
from .resnet import ResNet

__all__ = ['ResNet', 'RepVGG', 'RepMLPResNet', 'RepOptVGG']
